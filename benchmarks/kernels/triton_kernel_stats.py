"""Run a benchmark script and print the registers, spills and shared memory
of every Triton kernel it loads (diagnosing slow kernels: a spill means the
tile's registers did not fit).

    python benchmarks/kernels/triton_kernel_stats.py benchmarks/kernels/sweep_lora_gemm.py 2048

Triton reports these when it loads a compiled kernel onto the device; this
wraps that step (``CompiledKernel._init_handles``, Triton 3.x), so it reads
private API and may need updating with Triton.
"""
from __future__ import annotations

import runpy
import sys

from triton.compiler import compiler


def print_kernel_stats() -> None:
    load = compiler.CompiledKernel._init_handles
    seen = set()

    def load_and_report(kernel) -> None:
        load(kernel)
        key = (kernel.name, kernel.n_regs, kernel.n_spills, kernel.metadata.shared)
        if kernel.function is not None and key not in seen:
            seen.add(key)
            md = kernel.metadata
            print(f"[kernel] {kernel.name[:40]} regs {kernel.n_regs} spills {kernel.n_spills} "
                  f"smem {md.shared} warps {md.num_warps} stages {md.num_stages}", flush=True)
    compiler.CompiledKernel._init_handles = load_and_report


if __name__ == "__main__":
    print_kernel_stats()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
