"""Kernel timing shared by the benchmark and tuning scripts: median of
repeated runs, on CUDA with events and the L2 cache flushed before each
run, optionally replaying a captured CUDA graph."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch


def time_fn(fn: Callable[[], object], mode: str, device: str, iters: int) -> float:
    """Median milliseconds per call; ``mode`` "graph" or "eager"."""
    if device != "cuda":
        fn()
        samples = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return sorted(samples)[len(samples) // 2]
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)  # > L2
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if mode == "graph":
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            fn()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, stream=stream):
                fn()
        run = graph.replay
    else:
        run = fn
    samples = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return sorted(samples)[len(samples) // 2]
