"""Decode-size latency of MoE bookkeeping — top-k routing, pair alignment,
the per-adapter-slot alignment and the final sum of each token's expert
outputs — for each implementation (native, Triton, torch), and what the
choice does to a whole MoE-LoRA layer.

    python benchmarks/kernels/benchmark_moe_ops.py [--tokens 1 8 32 128]

Qwen3-30B-A3B routing shapes (128 experts, top-8), 4 adapter slots; its
expert outputs (hidden 2048, bfloat16) for the sum. Every
implementation's output is first checked against the torch reference
(bit for bit for the alignments). Times are medians of CUDA-graph replays
with a cold L2 on GPU (`--mode eager` for launch-bound numbers) or wall
time on the CPU.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from benchmarks.kernels.benchmark_moe_lora import Case, build  # noqa: E402
from benchmarks.kernels.timing import time_fn  # noqa: E402
from vllm import native  # noqa: E402
from vllm.model_executor.layers.fused_moe import moe_align  # noqa: E402
from vllm.model_executor.layers.fused_moe.router import (  # noqa: E402
    RouterConfig, select_experts_torch)

E, K, SLOTS, BLOCK = 128, 8, 4, 16
HIDDEN = 2048  # Qwen3-30B-A3B


def sum_ops(device: str, x: torch.Tensor, out: torch.Tensor) -> dict:
    """The MoE sum of ``x`` [T*K, HIDDEN] into ``out`` by implementation."""
    T = out.shape[0]
    fns = {"torch": lambda: torch.sum(x.view(T, K, HIDDEN), dim=1, out=out)}
    if device == "cuda":
        from vllm.model_executor.layers.fused_moe.kernels.moe_sum import moe_sum_triton
        fns["triton"] = lambda: moe_sum_triton(x, K, out)
    return fns


def implementations(device: str) -> list[str]:
    impls = ["torch"]
    if device == "cuda":
        impls.append("triton")
    if native.available(torch.device(device)):
        impls.append("native")
    return impls


def ops(impl: str, logits, ids, slots):
    """The three ops of one implementation, as zero-argument callables."""
    cfg = RouterConfig(K, renormalize=True)
    if impl == "native":
        routing = (lambda: native.topk_route(logits, K, "softmax", True, 1.0)) \
            if logits.is_cuda else None  # the CPU library has only the alignment
        return {"routing": routing,
                "align": lambda: native.moe_align(ids, BLOCK, E),
                "lora align": lambda: native.moe_align(ids, BLOCK, E, slots, SLOTS)}
    if impl == "triton":
        from vllm.model_executor.layers.fused_moe.kernels.moe_align_triton import (
            moe_align_block_size_triton, moe_lora_align_block_size_triton)
        return {"routing": None,
                "align": lambda: moe_align_block_size_triton(ids, BLOCK, E),
                "lora align": lambda: moe_lora_align_block_size_triton(ids, slots, BLOCK, E,
                                                                       SLOTS)}
    return {"routing": lambda: select_experts_torch(logits, cfg),
            "align": lambda: moe_align.moe_align_block_size_torch(ids, BLOCK, E),
            "lora align": lambda: moe_align.moe_lora_align_block_size_torch(ids, slots, BLOCK,
                                                                           E, SLOTS)}


def check(impl: str, fns: dict, logits, ids, slots) -> None:
    ref = ops("torch", logits, ids, slots)
    for name in ("align", "lora align"):
        for got, want in zip(fns[name](), ref[name]()):
            if not torch.equal(got.cpu(), want.cpu()):
                raise SystemExit(f"MISMATCH: {impl} {name} differs from the torch reference")
    if fns["routing"] is not None:
        w, i = fns["routing"]()
        rw, ri = ref["routing"]()
        if not torch.equal(i.sort(1).values, ri.sort(1).values):
            raise SystemExit(f"MISMATCH: {impl} routing chose other experts")
        if not torch.allclose(w.gather(1, i.sort(1).indices), rw.gather(1, ri.sort(1).indices),
                              rtol=1e-5, atol=1e-6):
            raise SystemExit(f"MISMATCH: {impl} routing weights")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--mode", default="graph", choices=["graph", "eager"])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--layer", action="store_true",
                   help="also time a whole Qwen3-30B-A3B MoE-LoRA layer per implementation")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = implementations(device)

    def mode_of(impl: str, op: str = "align") -> str:
        # the torch alignments size their outputs on the host (nonzero,
        # .item()): a CUDA graph cannot capture them, so they are timed eagerly
        return "eager" if impl == "torch" and op != "routing" and device == "cuda" else args.mode

    rows = []
    for T in args.tokens:
        g = torch.Generator().manual_seed(T)
        logits = torch.randn(T, E, generator=g).to(device)
        ids = select_experts_torch(logits, RouterConfig(K))[1]
        slots = torch.randint(-1, SLOTS, (T,), generator=g).to(device)
        for impl in impls:
            fns = ops(impl, logits, ids, slots)
            check(impl, fns, logits, ids, slots)
            times = {name: (time_fn(fn, mode_of(impl, name), device, args.iters) if fn
                            else float("nan"))
                     for name, fn in fns.items()}
            rows.append((T, impl, times))
    sum_rows = []
    for T in args.tokens:
        g = torch.Generator().manual_seed(T)
        x = torch.randn(T * K, HIDDEN, generator=g).to(device, torch.bfloat16)
        out = torch.empty(T, HIDDEN, dtype=torch.bfloat16, device=device)
        fns = sum_ops(device, x, out)
        want = x.view(T, K, HIDDEN).float().sum(1).to(torch.bfloat16)
        for impl, fn in fns.items():
            out.zero_()
            fn()
            # summation order may flip the bf16 rounding by one unit
            if not torch.allclose(out.float(), want.float(), rtol=2**-7, atol=1e-2):
                raise SystemExit(f"MISMATCH: {impl} MoE sum differs from the fp32 reference")
        sum_rows.append((T, {impl: time_fn(fn, args.mode, device, args.iters)
                             for impl, fn in fns.items()}))
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\nall outputs match the torch reference | device {name} | mode {args.mode} | "
          f"E={E} top-{K} {SLOTS} slots | microseconds"
          + (" | torch alignments timed eagerly" if device == "cuda" else ""))
    print(f"{'tokens':>7}{'impl':>8}{'routing':>10}{'align':>10}{'lora align':>12}{'sum':>10}")
    for T, impl, t in rows:
        total = sum(v for v in t.values() if v == v)
        print(f"{T:>7}{impl:>8}{t['routing'] * 1e3:>10.1f}{t['align'] * 1e3:>10.1f}"
              f"{t['lora align'] * 1e3:>12.1f}{total * 1e3:>10.1f}")
    sum_impls = list(sum_rows[0][1]) if sum_rows else []
    print(f"\nMoE sum of top-{K} expert outputs, hidden {HIDDEN}, bfloat16 | microseconds")
    print(f"{'tokens':>7}" + "".join(f"{i:>10}" for i in sum_impls))
    for T, t in sum_rows:
        print(f"{T:>7}" + "".join(f"{t[i] * 1e3:>10.1f}" for i in sum_impls))
    if args.layer and device == "cuda":
        print("\nMoE-LoRA layer (qwen3-30b-a3b, 4 adapters, rank 16), ms, by alignment impl")
        impls = [i for i in impls if mode_of(i) == args.mode]
        print(f"{'tokens':>7}" + "".join(f"{i:>10}" for i in impls))
        for T in args.tokens:
            _, experts, w, x, tw, tids, ctx, _ = build(Case("qwen3-30b-a3b", T, 4, 16), "triton",
                                                       device, torch.bfloat16)
            out = torch.empty_like(x)
            cells = []
            for impl in impls:
                os.environ["VLLM_MOE_OPS_IMPL"] = impl
                cells.append(time_fn(lambda: experts.apply(out, x, w, tw, tids, lora_context=ctx),
                                     args.mode, device, args.iters))
            os.environ.pop("VLLM_MOE_OPS_IMPL")
            print(f"{T:>7}" + "".join(f"{c:>10.3f}" for c in cells))


if __name__ == "__main__":
    main()
