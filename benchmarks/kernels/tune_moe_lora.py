"""Tune the launch configurations of the MoE LoRA kernels (shrink and expand
of both projections) for this device and write them where the Triton punica
wrapper finds them (``vllm/lora/ops/triton_ops/moe_lora_configs.py``).

    python benchmarks/kernels/tune_moe_lora.py --shapes qwen3-30b-a3b --adapters 4 --rank 16 \
        --tokens 1 8 32 128 512 2048 8192 [--out DIR]

For each token count (tokens spread round-robin over the adapters, random
routing) and each candidate alignment block, every shrink config is timed
per SPLIT_K and every expand config on a shrink output of that SPLIT_K; per
projection the (shrink, expand) pair with the smallest sum is kept (the
shrink alone with ``--shrink-only``), and the block with the smallest total
over both projections wins (CUDA-graph replay,
L2 flushed before each run). The chosen configs are checked against the
torch reference before they are written; results merge into an existing
file after each token count. Default output: the package's
``fused_moe/kernels/configs`` directory.
"""
from __future__ import annotations

import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from benchmarks.kernels.benchmark_moe_lora import SHAPES  # noqa: E402
from benchmarks.kernels.timing import time_fn  # noqa: E402
from benchmarks.kernels.tune_moe import tune_into_table, tuning_arguments  # noqa: E402
from vllm.lora.ops import torch_ops  # noqa: E402
from vllm.lora.ops.triton_ops.fused_moe_lora import (fused_moe_lora_expand,  # noqa: E402
                                                     fused_moe_lora_shrink)
from vllm.lora.ops.triton_ops.moe_lora_configs import moe_lora_config_filename  # noqa: E402
from vllm.model_executor.layers.fused_moe.kernels.tuned_configs import device_key  # noqa: E402
from vllm.model_executor.layers.fused_moe.moe_align import moe_lora_align_block_size  # noqa: E402
from vllm.model_executor.layers.fused_moe.router import RouterConfig, select_experts  # noqa: E402

SPACES = {
    "quick": dict(m=[16, 32, 64], k=[64, 128, 256], split=[1, 2, 4], stages=[3],
                  shrink_warps=[4], n=[32, 64, 128, 256], expand_warps=[4]),
    "full": dict(m=[16, 32, 64], k=[32, 64, 128, 256], split=[1, 2, 4, 8], stages=[2, 3, 4],
                 shrink_warps=[2, 4, 8], n=[32, 64, 128, 256], expand_warps=[2, 4, 8]),
}


def _projections(H: int, I: int, E: int, L: int, R: int, T: int, k: int, dtype, device, g):
    """Inputs of the two projections as the experts' apply() passes them."""
    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = rnd(T, H, scale=1.0)
    cache2 = rnd(T * k, I, scale=1.0)
    w13 = dict(x=x, a=[rnd(L, E, R, H, scale=H ** -0.5) for _ in range(2)],
               b=[rnd(L, E, I, R, scale=0.05) for _ in range(2)], gather=True,
               y=torch.zeros(T * k, 2 * I, device=device, dtype=dtype), offsets=[0, I],
               weights=None)
    w2 = dict(x=cache2, a=[rnd(L, E, R, I, scale=I ** -0.5)], b=[rnd(L, E, H, R, scale=0.05)],
              gather=False, y=torch.zeros(T * k, H, device=device, dtype=dtype), offsets=[0],
              weights=torch.rand(T, k, generator=g).to(device))
    return {"w13": w13, "w2": w2}


def _best_pair(p: dict, aligned: tuple, enabled, k: int, block: int, space: dict, mode: str,
               device: str, iters: int, shrink_only: bool) -> tuple[float, dict, dict]:
    S, rows, R = len(p["a"]), p["y"].shape[0], p["a"][0].shape[2]
    best = None
    for split in space["split"]:
        parts = torch.empty(split, S, rows, R, dtype=torch.float32, device=device)
        shrinks = [{"BLOCK_SIZE_K": bk, "SPLIT_K": split, "num_warps": w, "num_stages": st}
                   for bk, w, st in itertools.product(space["k"], space["shrink_warps"],
                                                      space["stages"])]
        expands = [{"BLOCK_SIZE_N": bn, "num_warps": w}
                   for bn, w in itertools.product(space["n"], space["expand_warps"])]
        timed_shrink, timed_expand = [], []
        for cfg in shrinks:
            def shrink(cfg=cfg):
                fused_moe_lora_shrink(p["x"], p["a"], *aligned, enabled, k, p["gather"], parts,
                                      block, cfg)
            try:
                timed_shrink.append((time_fn(shrink, mode, device, iters), cfg))
            except Exception as e:  # e.g. out of shared memory: not a candidate
                print(f"  skip shrink {cfg}: {type(e).__name__}")
        for cfg in expands:
            def expand(cfg=cfg):
                fused_moe_lora_expand(parts, p["b"], *aligned, enabled, p["y"], p["offsets"],
                                      p["weights"], block, cfg)
            try:
                timed_expand.append((time_fn(expand, mode, device, iters), cfg))
            except Exception as e:
                print(f"  skip expand {cfg}: {type(e).__name__}")
        if not timed_shrink or not timed_expand:
            continue
        ts, s_cfg = min(timed_shrink, key=lambda t: t[0])
        te, e_cfg = min(timed_expand, key=lambda t: t[0])
        total = ts if shrink_only else ts + te
        if best is None or total < best[0]:
            best = (total, s_cfg, e_cfg)
    return best


def check(p: dict, aligned: tuple, groups: list, enabled, k: int, block: int, shrink: dict,
          expand: dict) -> None:
    S, rows, R = len(p["a"]), p["y"].shape[0], p["a"][0].shape[2]
    parts = torch.empty(shrink["SPLIT_K"], S, rows, R, dtype=torch.float32, device=p["y"].device)
    out = torch.zeros_like(p["y"])
    ref = torch.zeros_like(p["y"])
    fused_moe_lora_shrink(p["x"], p["a"], *aligned, enabled, k, p["gather"], parts, block, shrink)
    fused_moe_lora_expand(parts, p["b"], *aligned, enabled, out, p["offsets"], p["weights"],
                          block, expand)
    inter = torch.zeros(S, rows, R, dtype=torch.float32, device=p["y"].device)
    torch_ops.fused_moe_lora_shrink(p["x"], p["a"], groups, k, p["gather"], inter)
    torch_ops.fused_moe_lora_expand(inter, p["b"], groups, ref, p["offsets"], p["weights"])
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    if not err < 2e-2:
        raise SystemExit(f"configs {shrink} / {expand} are wrong: relative error {err:.3e}")


def tune_tokens(H: int, I: int, E: int, k: int, L: int, R: int, T: int, space: dict,
                dtype: torch.dtype, device: str, iters: int, mode: str,
                shrink_only: bool = False) -> dict:
    g = torch.Generator().manual_seed(T)
    projections = _projections(H, I, E, L, R, T, k, dtype, device, g)
    _, topk_ids = select_experts(torch.randn(T, E, generator=g).to(device), RouterConfig(k))
    slots = torch.tensor([t % L for t in range(T)], dtype=torch.int32, device=device)
    enabled = torch.ones(L, dtype=torch.int32, device=device)
    best = None
    for block in space["m"]:
        aligned = moe_lora_align_block_size(topk_ids, slots, block, E, L)
        picks = {name: _best_pair(p, aligned, enabled, k, block, space, mode, device, iters,
                                  shrink_only)
                 for name, p in projections.items()}
        if any(v is None for v in picks.values()):
            continue
        total = sum(v[0] for v in picks.values())
        if best is None or total < best[0]:
            best = (total, block, picks, aligned)
    total, block, picks, aligned = best
    groups = torch_ops.moe_lora_groups(topk_ids, slots, enabled)
    for name, p in projections.items():
        check(p, aligned, groups, enabled, k, block, picks[name][1], picks[name][2])
    entry = {"block_size_m": block,
             **{name: {"shrink": v[1], "expand": v[2]} for name, v in picks.items()}}
    print(f"T={T}: {total * 1e3:.1f} us  {json.dumps(entry)}", flush=True)
    return entry


def main() -> None:
    p = tuning_arguments(__doc__, SPACES)
    p.add_argument("--adapters", type=int, default=4, help="adapter slots (--max-loras)")
    p.add_argument("--rank", type=int, default=16, help="slot rank (--max-lora-rank)")
    p.add_argument("--shrink-only", action="store_true",
                   help="rank by the shrinks' time alone: where the expert GEMMs add the "
                        "expand in their epilogue, the separate expand never runs")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    os.makedirs(args.out, exist_ok=True)
    L, R = args.adapters, args.rank
    for shape in args.shapes:
        H, I, E, k = SHAPES[shape]
        name = moe_lora_config_filename(E, H, I, R, L, dtype, device_key())
        tune_into_table(os.path.join(args.out, name), args.tokens,
                        lambda T, _: tune_tokens(H, I, E, k, L, R, T, SPACES[args.space], dtype,
                                              device, args.iters, args.mode, args.shrink_only))


if __name__ == "__main__":
    main()
