"""One expert GEMM of a Qwen3-30B-A3B layer alone (GPU), without LoRA and
with LoRA inside it (``moe_lora_in_gemm``): in-loop shrink ("gemm"), the
shrink output read in the epilogue before the K loop ("epi-early"), after
it ("epi-late"), or one dot per slot after it, its operands read after
("epi-slots") or before the loop ("epi-slots-e"), and the spread shrink
output multiplied in extra K steps ("loop"). Each is
timed with the base GEMM's tuned config and with the best of a small
sweep, which tells whether a LoRA placement is slow in itself or only with
the base's launch parameters.

    python benchmarks/kernels/sweep_lora_gemm.py 1 8 128 512     # token counts
    python benchmarks/kernels/sweep_lora_gemm.py 2048 8192 --tuned-only

4 adapters of rank 16, tokens round-robin over them; CUDA-graph replay with
a cold L2 (``timing.time_fn``), microseconds.
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
from vllm.lora.ops.triton_ops.moe_lora_in_gemm import (MoELoRAGemmFusion,  # noqa: E402
                                                        fused_width)
from vllm.model_executor.layers.fused_moe.kernels.fused_moe_gemm import (  # noqa: E402
    invoke_fused_moe_gemm)
from vllm.model_executor.layers.fused_moe.kernels.tuned_configs import (  # noqa: E402
    expert_gemm_configs)
from vllm.model_executor.layers.fused_moe.moe_align import moe_align_block_size  # noqa: E402
from vllm.model_executor.layers.fused_moe.router import RouterConfig, select_experts  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("tokens", type=int, nargs="*", default=[1, 8, 128, 512])
    p.add_argument("--tuned-only", action="store_true", help="skip the sweep")
    args = p.parse_args()
    H, I, E, k, L, R = 2048, 768, 128, 8, 4, 16
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.05).to(dev, dt)  # noqa: E731
    w13, w2 = rnd(E, 2 * I, H), rnd(E, H, I)
    a13 = [rnd(L, E, R, H) for _ in range(2)]
    b13 = [rnd(L, E, I, R) for _ in range(2)]
    a2, b2 = rnd(L, E, R, I), rnd(L, E, H, R)
    enabled = torch.ones(L, dtype=torch.int32, device=dev)
    print(f"{'T':>5} {'gemm':<4} {'variant':<10} {'tuned us':>9} {'best us':>9}  best config")
    for T in args.tokens:
        x = rnd(T, H) * 20
        cache2 = rnd(T * k, I) * 20
        tw, ids = select_experts(torch.randn(T, E, generator=g).to(dev), RouterConfig(k))
        slots = torch.arange(T, dtype=torch.int32, device=dev) % L
        cfg13, cfg2 = expert_gemm_configs(T, k, E, H, I, dt)
        for name, a, w, cfg, gather, weights, fa, fb, offs in (
                ("w13", x, w13, cfg13, True, None, a13, b13, [0, I]),
                ("w2", cache2, w2, cfg2, False, tw, [a2], [b2], [0])):
            sorted_ids, expert_ids, npp = moe_align_block_size(ids, cfg["BLOCK_SIZE_M"], E)
            aligned = dict(sorted_pair_ids=sorted_ids, expert_ids=expert_ids,
                           num_pairs_post_padded=npp, top_k=k)
            out = torch.empty(T * k, w.shape[1], device=dev, dtype=dt)
            inter = torch.randn(1, len(fa), T * k, R, device=dev)
            gemm = MoELoRAGemmFusion(slots, enabled, fb, offs, k, lora_a=fa)
            epi = MoELoRAGemmFusion(slots, enabled, fb, offs, k, inter=inter)
            spread = torch.zeros(len(fa), T * k, fused_width(L, R), device=dev, dtype=dt)
            for slot in range(L):  # each pair's row in its slot's columns
                rows = (slots == slot).repeat_interleave(k)
                spread[:, rows, slot * R:(slot + 1) * R] = inter[0][:, rows].to(dt)
            loop = MoELoRAGemmFusion(slots, enabled, fb, offs, k, inter=spread,
                                     inter_spread=True)
            variants = {"base": (None, False, False), "gemm": (gemm, True, False),
                        "epi-early": (epi, True, False), "epi-late": (epi, False, False),
                        "epi-slots": (epi, False, True), "epi-slots-e": (epi, True, True),
                        "loop": (loop, False, False)}
            for vname, (lora, early, per_slot) in variants.items():
                def run(c, lora=lora, a=a, w=w, out=out, gather=gather, weights=weights,
                        aligned=aligned):
                    invoke_fused_moe_gemm(a, w, out, gather_rows=gather, topk_weights=weights,
                                          config=c, lora=lora, **aligned)
                lora_cfg = dict(lora_early=early, lora_per_slot=per_slot)
                try:
                    tuned = time_fn(lambda: run(dict(cfg, **lora_cfg)), "graph", dev, 20)
                except OutOfResources:  # e.g. shared memory
                    tuned = float("inf")
                best = (tuned, cfg)
                sweep = [] if args.tuned_only else itertools.product([64, 128], [64, 128], [3, 4])
                for n, kk, st in sweep:
                    c = dict(cfg, BLOCK_SIZE_N=n, BLOCK_SIZE_K=kk, num_stages=st, **lora_cfg)
                    try:
                        t = time_fn(lambda: run(c), "graph", dev, 10)
                    except OutOfResources:
                        continue
                    best = min(best, (t, c), key=lambda b: b[0])
                shown = {k_: v for k_, v in best[1].items() if k_ != "GROUP_SIZE_M"}
                print(f"{T:>5} {name:<4} {vname:<10} {tuned * 1e3:>9.1f} {best[0] * 1e3:>9.1f}  "
                      f"{shown}", flush=True)


if __name__ == "__main__":
    main()
