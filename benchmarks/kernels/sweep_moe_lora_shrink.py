"""The MoE LoRA shrinks of one Qwen3-30B-A3B layer (GPU, 4 adapters of rank
16, tokens round-robin over them) two ways, side by side: over the per-slot
alignment (its alignment launch included, the tuned launch configs) and
over the base GEMMs' alignment (``moe_lora_shrink_base_aligned``: no
alignment launch, every slot's factors side by side), the latter with its
heuristic config and the best of a small sweep.

    python benchmarks/kernels/sweep_moe_lora_shrink.py 1 8 32 128 512 2048 8192

Both shrinks (w13 from the hidden states, w2 from the activation) per
token count; CUDA-graph replay with a cold L2 (``timing.time_fn``), µs.
Every config's output is checked against the per-slot shrink first.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
from triton.runtime.errors import OutOfResources

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from benchmarks.kernels.timing import time_fn  # noqa: E402
from vllm.lora.ops.triton_ops.fused_moe_lora import fused_moe_lora_shrink  # noqa: E402
from vllm.lora.ops.triton_ops.moe_lora_configs import moe_lora_launch  # noqa: E402
from vllm.lora.ops.triton_ops.moe_lora_in_gemm import moe_lora_shrink_base_aligned  # noqa: E402
from vllm.model_executor.layers.fused_moe.kernels.tuned_configs import (  # noqa: E402
    expert_gemm_configs)
from vllm.model_executor.layers.fused_moe.moe_align import (  # noqa: E402
    moe_align_block_size, moe_lora_align_block_size)
from vllm.model_executor.layers.fused_moe.router import RouterConfig, select_experts  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("tokens", type=int, nargs="*", default=[1, 8, 128, 2048])
    args = p.parse_args()
    H, I, E, k, L, R = 2048, 768, 128, 8, 4, 16
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: (torch.randn(*s, generator=g, device=dev) * 0.05).to(dt)  # noqa: E731
    a13, a2 = [rnd(L, E, R, H) for _ in range(2)], [rnd(L, E, R, I)]
    enabled = torch.ones(L, dtype=torch.int32, device=dev)
    print(f"{'T':>5} {'per-slot us':>12} {'base-aligned us':>16} {'best us':>8}  best config")
    for T in args.tokens:
        x, cache2 = rnd(T, H) * 20, rnd(T * k, I) * 20
        _, ids = select_experts(torch.randn(T, E, generator=g, device=dev), RouterConfig(k))
        slots = torch.arange(T, dtype=torch.int32, device=dev) % L
        launch = moe_lora_launch(T, k, E, H, I, R, R, L, dt)
        block = expert_gemm_configs(T, k, E, H, I, dt, lora=True)[0]["BLOCK_SIZE_M"]
        base = moe_align_block_size(ids, block, E)
        shrinks = ((x, a13, True, launch.w13_shrink), (cache2, a2, False, launch.w2_shrink))

        def per_slot(outs):
            aligned = moe_lora_align_block_size(ids, slots, launch.block_size_m, E, L)
            for (a, fa, gather, cfg), out in zip(shrinks, outs):
                fused_moe_lora_shrink(a, fa, *aligned, enabled, k, gather, out,
                                      launch.block_size_m, cfg)

        def base_aligned(outs, cfg):
            for (a, fa, gather, _), out in zip(shrinks, outs):
                moe_lora_shrink_base_aligned(a, fa, *base, slots, enabled, k, gather, out, cfg)

        def buffers(split_ks):
            return [torch.zeros(sk, len(fa), T * k, R, device=dev)
                    for sk, (_, fa, _, _) in zip(split_ks, shrinks)]
        ref = buffers([launch.w13_shrink["SPLIT_K"], launch.w2_shrink["SPLIT_K"]])
        per_slot(ref)
        ref_sums = [r.sum(0) for r in ref]
        t_slot = time_fn(lambda: per_slot(ref), "graph", dev, 20)

        def timed(cfg):
            outs = buffers([cfg["SPLIT_K"] if cfg else 1] * 2)
            base_aligned(outs, cfg)
            for out, want in zip(outs, ref_sums):
                err = ((out.sum(0) - want).norm() / want.norm()).item()
                if not err < 1e-2:
                    raise SystemExit(f"T={T} config {cfg}: relative error {err:.2e}")
            return time_fn(lambda: base_aligned(outs, cfg), "graph", dev, 20)
        t_default = timed(None)
        best = (t_default, None)
        for bk, sk, w, st in itertools.product([64, 128, 256], [1, 2, 4], [4], [3]):
            cfg = dict(BLOCK_SIZE_K=bk, SPLIT_K=sk, num_warps=w, num_stages=st)
            try:
                best = min(best, (timed(cfg), cfg), key=lambda b: b[0])
            except OutOfResources:
                continue
        print(f"{T:>5} {t_slot * 1e3:>12.1f} {t_default * 1e3:>16.1f} {best[0] * 1e3:>8.1f}  "
              f"{best[1]}", flush=True)


if __name__ == "__main__":
    main()
