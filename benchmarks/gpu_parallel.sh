#!/usr/bin/env bash
# On a 2-GPU machine (one call, under ~8 minutes): the parallel tests over
# NCCL, then EP=2 vs TP=2 throughput. Each test is bounded and reported as it
# finishes, so a stall shows where it is instead of eating the call.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
nvidia-smi -L
timeout 90 python3 -m vllm.native_build 2>&1 | tail -1  # once, before the ranks start
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_native_ops.py \
  -k second_device 2>&1 | tail -2
timeout 320 python3 -m pytest -v -p no:cacheprovider --timeout 120 --timeout-method=thread tests/distributed \
  -k "${TESTS:-not four_ranks and not ray}" 2>&1 | tee "$OUT/pytest_parallel.log" \
  | grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed"
for mode in "" "--enable-expert-parallel"; do
  timeout 200 python3 benchmarks/benchmark_throughput.py --random-shape qwen3-30b-a3b \
    --num-layers 4 --batch-size 64 --input-len 128 --output-len 256 -tp 2 $mode \
    --lora-comparison 4 2>&1 \
    | tee -a "$OUT/throughput_parallel.log" | grep -E -A4 "^system|^generated"
done
