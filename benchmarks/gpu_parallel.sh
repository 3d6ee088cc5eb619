#!/usr/bin/env bash
# On a 2-GPU machine: the parallel tests over NCCL, then EP=2 vs TP=2 throughput.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
nvidia-smi -L
python3 -m pytest -q -p no:cacheprovider tests/distributed 2>&1 | tee "$OUT/pytest_parallel.log" | tail -15
for mode in "" "--enable-expert-parallel"; do
  python3 benchmarks/benchmark_throughput.py --random-shape qwen3-30b-a3b --num-layers 8 \
    --batch-size 64 --input-len 128 --output-len 128 -tp 2 $mode 2>&1 \
    | tee -a "$OUT/throughput_parallel.log" | grep -A3 "^model"
done
