"""Diagnose a multi-GPU engine start: time each stage of a tiny TP=2 engine;
if anything stalls past --deadline seconds, every process of the engine
dumps its Python stack (faulthandler) before the script exits."""
from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def dump_everything_after(seconds: float) -> None:
    def fire():
        time.sleep(seconds)
        print(f"\n=== stalled for {seconds}s: dumping stacks ===", flush=True)
        import psutil
        for child in psutil.Process().children(recursive=True):
            os.kill(child.pid, signal.SIGABRT)
        time.sleep(2)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(3)
    threading.Thread(target=fire, daemon=True).start()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--deadline", type=float, default=150)
    p.add_argument("--modes", nargs="+", default=["eager", "graphs", "graphs+lora"])
    args = p.parse_args()
    os.environ["PYTHONFAULTHANDLER"] = "1"  # inherited by spawned workers
    faulthandler.enable()
    dump_everything_after(args.deadline)
    from vllm import LLM, SamplingParams
    from vllm.tools.make_tiny_model import make_tiny_model
    path = make_tiny_model("qwen3_moe", os.path.join(tempfile.gettempdir(), "diag-tiny"))
    t0 = time.time()
    for mode in args.modes:
        start = time.time()
        llm = LLM(path, dtype="float32", max_model_len=128, tensor_parallel_size=2,
                  enforce_eager=mode == "eager", enable_lora="lora" in mode, max_num_seqs=16)
        built = time.time()
        out = llm.generate(["hello world"] * 3, SamplingParams(temperature=0, max_tokens=8),
                           use_tqdm=False)
        print(f"[{time.time() - t0:6.1f}s] {mode}: engine {built - start:.1f}s, generate "
              f"{time.time() - built:.1f}s, tokens {out[0].outputs[0].token_ids}", flush=True)
        llm.llm_engine.shutdown()
        del llm


if __name__ == "__main__":
    main()
