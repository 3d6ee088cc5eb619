"""Tune the launch configurations of the unquantized expert GEMMs for this
device and write them where ``TritonExperts`` finds them.

    python benchmarks/kernels/tune_moe.py --shapes qwen3-30b-a3b \
        --tokens 1 8 32 128 512 2048 8192 [--space quick|full] [--out DIR]

For each token count, random routing is aligned once per candidate
BLOCK_SIZE_M; for each of the two GEMMs the fastest of the candidate
(BLOCK_SIZE_N, BLOCK_SIZE_K, GROUP_SIZE_M, num_warps, num_stages) is kept
(CUDA-graph replay, L2 flushed before each run); the BLOCK_SIZE_M with the
smallest total wins. Each chosen pair of configs is checked against the
torch reference before it is written. Results merge into an existing file,
so token counts can be tuned over several runs. Default output: the
package's ``kernels/configs`` directory.

    python benchmarks/kernels/tune_moe.py --lora --tokens 512 2048 8192

``--lora`` tunes, for token counts the file already has, the configs of the
GEMMs that add LoRA in their epilogue (``w13_lora`` / ``w2_lora``; the
entry's BLOCK_SIZE_M, ``--adapters`` slots of ``--rank``, the shrink's
output given), from the ``lora`` space unless ``--space`` names another;
``--fusion loop``: GEMMs that add it as extra K steps instead (fusion
"loop" of ``moe_lora_in_gemm``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from benchmarks.kernels.benchmark_moe_lora import SHAPES  # noqa: E402
from benchmarks.kernels.timing import time_fn  # noqa: E402
from vllm.lora.ops.triton_ops.moe_lora_in_gemm import (MoELoRAGemmFusion,  # noqa: E402
                                                        fused_width)
from vllm.model_executor.layers.fused_moe.kernels.fused_moe_gemm import (  # noqa: E402
    fused_moe_gemm_torch, invoke_fused_moe_gemm)
from vllm.model_executor.layers.fused_moe.kernels.tuned_configs import (  # noqa: E402
    CONFIG_DIR, config_filename, device_key, expert_gemm_configs_untuned)
from vllm.model_executor.layers.fused_moe.moe_align import moe_align_block_size  # noqa: E402
from vllm.model_executor.layers.fused_moe.router import RouterConfig, select_experts  # noqa: E402

SPACES = {
    "quick": dict(m=[16, 32, 64, 128], n=[64, 128], k=[64, 128], group=[1, 16], warps=[4],
                  stages=[3, 4]),
    # narrow column blocks (more programs over few experts) for decode sizes
    "small": dict(m=[16], n=[16, 32, 64], k=[64, 128, 256], group=[1], warps=[2, 4],
                  stages=[3, 4, 5]),
    # wide tiles only, with 8 warps and deeper pipelines: for thousands of tokens
    "large": dict(m=[64, 128], n=[128, 256], k=[64, 128], group=[1, 16], warps=[4, 8],
                  stages=[3, 4]),
    "full": dict(m=[16, 32, 64, 128], n=[32, 64, 128, 256], k=[64, 128, 256], group=[1, 16],
                 warps=[4, 8], stages=[3, 4, 5]),
    # a few wide tiles, to try against the heuristics in one short run
    "wide": dict(m=[64, 128], n=[128, 256], k=[64], group=[1, 16], warps=[8], stages=[3, 4]),
    # GEMMs with the LoRA epilogue (BLOCK_SIZE_M is the entry's): two stages
    # leave room for a second program per SM to hide the epilogue's latency
    "lora": dict(m=[], n=[128, 256], k=[64], group=[1, 16], warps=[4, 8], stages=[2, 3, 4]),
}


def candidates(space: dict, block_m: int) -> list[dict]:
    return [{"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": n, "BLOCK_SIZE_K": k, "GROUP_SIZE_M": g,
             "num_warps": w, "num_stages": s}
            for n, k, g, w, s in itertools.product(space["n"], space["k"], space["group"],
                                                   space["warps"], space["stages"])]


def fastest_config(configs: list[dict], run: Callable[[dict], None], mode: str, device: str,
                   iters: int) -> tuple[float, dict]:
    """(ms, config) of the fastest ``run(config)``; a config that fails
    (e.g. out of shared memory) is no candidate."""
    timed = []
    for cfg in configs:
        try:
            timed.append((time_fn(lambda: run(cfg), mode, device, iters), cfg))
        except Exception as e:
            print(f"  skip {cfg}: {type(e).__name__}")
    return min(timed, key=lambda t: t[0])


def tune_tokens(H: int, I: int, E: int, k: int, T: int, space: dict, dtype: torch.dtype,
                device: str, iters: int, mode: str) -> dict:
    g = torch.Generator().manual_seed(T)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(device, dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(device, dtype)
    x = torch.randn(T, H, generator=g).to(device, dtype)
    cache2 = torch.randn(T * k, I, generator=g).to(device, dtype)
    topk_weights, topk_ids = select_experts(torch.randn(T, E, generator=g).to(device),
                                            RouterConfig(k))
    best = None
    for block_m in space["m"]:
        sorted_ids, expert_ids, padded = moe_align_block_size(topk_ids, block_m, E)
        aligned = dict(sorted_pair_ids=sorted_ids, expert_ids=expert_ids,
                       num_pairs_post_padded=padded, top_k=k)
        out1 = torch.empty(T * k, 2 * I, device=device, dtype=dtype)
        out2 = torch.empty(T * k, H, device=device, dtype=dtype)
        picks = []
        for a, w, out, gather, weights in ((x, w13, out1, True, None),
                                           (cache2, w2, out2, False, topk_weights)):
            def run(cfg, a=a, w=w, out=out, gather=gather, weights=weights):
                invoke_fused_moe_gemm(a, w, out, gather_rows=gather, topk_weights=weights,
                                      config=cfg, **aligned)
            picks.append(fastest_config(candidates(space, block_m), run, mode, device, iters))
        total = picks[0][0] + picks[1][0]
        if best is None or total < best[0]:
            best = (total, picks[0][1], picks[1][1], aligned)
    total, cfg13, cfg2, aligned = best
    check(x, w13, cache2, w2, topk_weights, aligned, cfg13, cfg2)
    print(f"T={T}: {total * 1e3:.1f} us  w13 {cfg13}  w2 {cfg2}")
    heuristic = untuned_time(x, w13, cache2, w2, topk_weights, topk_ids, mode, device, iters)
    print(f"T={T}: heuristics (no table) {heuristic * 1e3:.1f} us, "
          f"{heuristic / total:.2f}x the tuned time")
    return {"w13": cfg13, "w2": cfg2}


def untuned_time(x, w13, cache2, w2, topk_weights, topk_ids, mode: str, device: str,
                 iters: int) -> float:
    """Both GEMMs with the configs a shape without a table gets."""
    T, k = topk_ids.shape
    E, I2, H = w13.shape
    total = 0.0
    for a, w, gather, weights, cfg in zip(
            (x, cache2), (w13, w2), (True, False), (None, topk_weights),
            expert_gemm_configs_untuned(T, k, E, H, I2 // 2, x.dtype)):
        sorted_ids, expert_ids, padded = moe_align_block_size(topk_ids, cfg["BLOCK_SIZE_M"], E)
        out = torch.empty(T * k, w.shape[1], device=device, dtype=x.dtype)
        total += time_fn(lambda: invoke_fused_moe_gemm(
            a, w, out, gather_rows=gather, topk_weights=weights, config=cfg,
            sorted_pair_ids=sorted_ids, expert_ids=expert_ids, num_pairs_post_padded=padded,
            top_k=k), mode, device, iters)
    return total


def tune_lora_tokens(H: int, I: int, E: int, k: int, T: int, entry: dict, L: int, R: int,
                     space: dict, dtype: torch.dtype, device: str, iters: int,
                     mode: str, fusion: str = "epilogue") -> dict:
    """``entry`` plus the fastest configs of both GEMMs adding L slots of
    rank-R LoRA in their epilogue, or as K steps (``fusion`` "loop"; tokens
    round-robin over the slots)."""
    g = torch.Generator().manual_seed(T)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    w13, w2 = rnd(E, 2 * I, H) * H ** -0.5, rnd(E, H, I) * I ** -0.5
    x, cache2 = rnd(T, H), rnd(T * k, I)
    topk_weights, topk_ids = select_experts(torch.randn(T, E, generator=g).to(device),
                                            RouterConfig(k))
    block_m = entry["w13"]["BLOCK_SIZE_M"]
    sorted_ids, expert_ids, padded = moe_align_block_size(topk_ids, block_m, E)
    aligned = dict(sorted_pair_ids=sorted_ids, expert_ids=expert_ids,
                   num_pairs_post_padded=padded, top_k=k)
    slots = torch.arange(T, dtype=torch.int32, device=device) % L
    enabled = torch.ones(L, dtype=torch.int32, device=device)
    def shrink_out(S: int) -> torch.Tensor:
        if fusion == "epilogue":
            return torch.randn(S, T * k, R, device=device)
        # random values in every column: the spread layout's zeros change no timing
        return rnd(S, T * k, fused_width(L, R))
    loras = [MoELoRAGemmFusion(slots, enabled, [rnd(L, E, I, R) * 0.05 for _ in range(2)],
                               [0, I], k, inter=shrink_out(2), inter_spread=fusion == "loop"),
             MoELoRAGemmFusion(slots, enabled, [rnd(L, E, H, R) * 0.05], [0], k,
                               inter=shrink_out(1), inter_spread=fusion == "loop")]
    picks = []
    for a, w, gather, weights, lora in ((x, w13, True, None, loras[0]),
                                        (cache2, w2, False, topk_weights, loras[1])):
        out = torch.empty(T * k, w.shape[1], device=device, dtype=dtype)

        def run(cfg, a=a, w=w, out=out, gather=gather, weights=weights, lora=lora):
            invoke_fused_moe_gemm(a, w, out, gather_rows=gather, topk_weights=weights,
                                  config=cfg, lora=lora, **aligned)
        picks.append(fastest_config(candidates(space, block_m), run, mode, device, iters))
    check(x, w13, cache2, w2, topk_weights, aligned, picks[0][1], picks[1][1], loras)
    print(f"T={T} with LoRA: {(picks[0][0] + picks[1][0]) * 1e3:.1f} us  w13 {picks[0][1]}  "
          f"w2 {picks[1][1]}")
    return dict(entry, w13_lora=picks[0][1], w2_lora=picks[1][1])


def check(x, w13, cache2, w2, topk_weights, aligned, cfg13, cfg2,
          loras: list | None = None) -> None:
    T, k = x.shape[0], aligned["top_k"]
    for a, w, gather, weights, cfg, lora in ((x, w13, True, None, cfg13, loras and loras[0]),
                                             (cache2, w2, False, topk_weights, cfg2,
                                              loras and loras[1])):
        out = torch.full((T * k, w.shape[1]), float("nan"), device=x.device, dtype=x.dtype)
        ref = torch.full_like(out, float("nan"))
        invoke_fused_moe_gemm(a, w, out, gather_rows=gather, topk_weights=weights, config=cfg,
                              lora=lora, **aligned)
        fused_moe_gemm_torch(a, w, ref, gather_rows=gather, topk_weights=weights, lora=lora,
                             **aligned)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        if not err < 2e-2:
            raise SystemExit(f"config {cfg} is wrong: relative error {err:.3e}")


def keep_lora_configs(old: dict | None, new: dict) -> dict:
    """The LoRA configs of a re-tuned entry that still fit its block size."""
    if not old or "w13_lora" not in old:
        return {}
    if old["w13_lora"]["BLOCK_SIZE_M"] != new["w13"]["BLOCK_SIZE_M"]:
        print("  the block size changed: its LoRA configs are dropped (tune again with --lora)")
        return {}
    return {key: old[key] for key in ("w13_lora", "w2_lora")}


def tuning_arguments(doc: str, spaces: dict) -> argparse.ArgumentParser:
    """The command line both tuners share."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["qwen3-30b-a3b"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 512, 2048, 8192])
    p.add_argument("--space", default="quick", choices=sorted(spaces))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--mode", default="graph", choices=["graph", "eager"])
    p.add_argument("--out", default=CONFIG_DIR)
    return p


def tune_into_table(path: str, tokens: list[int],
                    tune: Callable[[int, dict | None], dict]) -> None:
    """``tune(T, the table's entry for T or None)`` for each token count,
    merged into the JSON table at ``path``; written after each count, so a
    long run keeps its results."""
    table = json.load(open(path)) if os.path.isfile(path) else {}
    for T in tokens:
        table[str(T)] = tune(T, table.get(str(T)))
        with open(path, "w") as f:
            json.dump(dict(sorted(table.items(), key=lambda kv: int(kv[0]))), f, indent=1)
    print(f"wrote {path}")


def main() -> None:
    p = tuning_arguments(__doc__, SPACES)
    p.add_argument("--lora", action="store_true",
                   help="tune the GEMMs that add LoRA (w13_lora / w2_lora)")
    p.add_argument("--adapters", type=int, default=4, help="adapter slots for --lora")
    p.add_argument("--rank", type=int, default=16, help="adapter rank for --lora")
    p.add_argument("--fusion", default="epilogue", choices=["epilogue", "loop"],
                   help="where the GEMMs tuned by --lora add it")
    p.set_defaults(space=None)  # quick, or lora with --lora
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    os.makedirs(args.out, exist_ok=True)
    space = SPACES[args.space or ("lora" if args.lora else "quick")]

    for shape in args.shapes:
        H, I, E, k = SHAPES[shape]

        def tune(T: int, entry: dict | None) -> dict:
            if not args.lora:
                new = tune_tokens(H, I, E, k, T, space, dtype, device, args.iters, args.mode)
                return dict(new, **keep_lora_configs(entry, new))
            if entry is None:
                raise SystemExit(f"--lora: no base entry for {T} tokens; tune the base first")
            return tune_lora_tokens(H, I, E, k, T, entry, args.adapters, args.rank, space, dtype,
                                    device, args.iters, args.mode, args.fusion)
        tune_into_table(os.path.join(args.out, config_filename(E, H, I, dtype, device_key())),
                        args.tokens, tune)


if __name__ == "__main__":
    main()
