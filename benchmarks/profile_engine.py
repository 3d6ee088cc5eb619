"""Where does an engine step spend its time? Runs a batch to steady decode,
then profiles a few steps with torch.profiler and prints the top ops.

    python benchmarks/profile_engine.py --model /tmp/bench-random-model --batch-size 64
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.engine.llm_engine import LLMEngine
    engine = LLMEngine.from_engine_args(EngineArgs(
        args.model, dtype=args.dtype, max_model_len=args.input_len + 256,
        max_num_seqs=args.batch_size, enable_lora=args.enable_lora), progress=False)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    for i in range(args.batch_size):
        engine.add_request(str(i), torch.randint(10, 400, (args.input_len,), generator=g).tolist(),
                           params)
    for _ in range(3):  # prefill + warm decode
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        engine.step()
    torch.cuda.synchronize()
    print(f"decode step: {(time.perf_counter() - start) / 10 * 1e3:.2f} ms "
          f"(batch {args.batch_size})")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(table.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(table.table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    main()
