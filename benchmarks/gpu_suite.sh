#!/usr/bin/env bash
# One device call: environment, GPU correctness tests, then benchmarks.
# Usage (on the GPU machine, repo root): bash benchmarks/gpu_suite.sh [tests|bench|all]
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
what="${1:-all}"
python3 - <<'PY'
import torch, triton, transformers
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
PY
git log -1 --format='commit %H %s' 2>/dev/null || true
status=0
if [[ "$what" == tests || "$what" == all ]]; then
  python3 -m pytest -q -m gpu -p no:cacheprovider --ignore=tests/entrypoints tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
  status=${PIPESTATUS[0]}
  python3 benchmarks/kernels/kernel_errors.py 2>&1 | tee "$OUT/kernel_errors.log" | tail -10
  status=$(( status | PIPESTATUS[0] ))
fi
if [[ "$what" == lora || "$what" == all ]]; then
  python3 benchmarks/kernels/benchmark_moe_lora.py --shapes qwen3-30b-a3b --adapters 4 --ranks 16 \
    --mode graph eager 2>&1 | tee "$OUT/moe_lora.log" | tail -20
  status=$(( status | PIPESTATUS[0] ))
  for q in fp8-block int4; do  # retention with quantized experts (LoRA stays bf16)
    python3 benchmarks/kernels/benchmark_moe_lora.py --shapes qwen3-30b-a3b --adapters 4 \
      --ranks 16 --mode graph --quant $q 2>&1 | tee -a "$OUT/moe_lora_quant.log" | tail -9
  done
fi
if [[ "$what" == ops || "$what" == all ]]; then
  python3 -m vllm.native_build 2>&1 | tail -1   # native ops for this machine (CUDA part too)
  python3 benchmarks/kernels/benchmark_moe_ops.py --layer 2>&1 | tee "$OUT/moe_ops.log" | tail -16
fi
if [[ "$what" == bench || "$what" == all ]]; then
  python3 benchmarks/benchmark_throughput.py --random-shape qwen3-30b-a3b --num-layers 4 \
    --batch-size 64 --input-len 128 --output-len 128 --compare-hf 2>&1 | tee "$OUT/throughput.log" | tail -8
  for bs in 32 64; do
    python3 benchmarks/benchmark_throughput.py --random-shape qwen3-30b-a3b --num-layers 4 \
      --batch-size $bs --lora-comparison 4 2>&1 | tee -a "$OUT/throughput_lora.log" | tail -6
  done
fi
exit $status
