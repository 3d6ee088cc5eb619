"""One MoE layer with and without LoRA: base time, base + LoRA time,
retention (base / (base + LoRA)), bytes moved, achieved bandwidth and the
bytes ceiling on retention — measured side by side in one run.

    python benchmarks/kernels/benchmark_moe_lora.py                       # H100 defaults
    python benchmarks/kernels/benchmark_moe_lora.py --shapes qwen3-30b-a3b --tokens 1 8 32 \
        --adapters 4 --ranks 16 --mode graph
    python benchmarks/kernels/benchmark_moe_lora.py --shapes qwen3-30b-a3b --adapters 4 \
        --ranks 16 --mode graph --fusion gemm epilogue loop off    # where LoRA is computed
    python benchmarks/kernels/benchmark_moe_lora.py --shapes qwen3-30b-a3b --adapters 4 \
        --ranks 16 --mode eager --profile 8                   # device time per kernel
    python benchmarks/kernels/benchmark_moe_lora.py --shapes tiny --backend torch   # CPU

Every configuration is first checked against the torch reference (the
script exits non-zero on a mismatch), then timed. ``--mode graph`` replays a
captured CUDA graph with the L2 cache flushed before every replay; ``eager``
launches normally. Routing is random (softmax top-k of random logits);
every token runs one of the adapters, chosen round-robin.

Bytes: base = the weights of every expert the batch touches + activations
in and out; LoRA = the factors of every (adapter, expert) pair touched.
The ceiling on retention is base_bytes / (base_bytes + lora_bytes): what a
purely bandwidth-bound implementation could keep.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from benchmarks.kernels.timing import time_fn  # noqa: E402
from vllm.lora.lora_context import MoELoRAContext  # noqa: E402
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, MoEActivation  # noqa: E402
from vllm.model_executor.layers.fused_moe.experts.base import ExpertWeights  # noqa: E402
from vllm.model_executor.layers.fused_moe.router import RouterConfig, select_experts  # noqa: E402

SHAPES = {  # hidden, intermediate, experts, top-k
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "gpt-oss-20b": (2880, 2880, 32, 4),
    "tiny": (64, 32, 8, 2),
}


@dataclass
class Case:
    shape: str
    tokens: int
    adapters: int
    rank: int


QUANT_SCHEMES = ("none", "fp8-block", "fp8-channel", "int4")


def quantize_experts(weights: ExpertWeights, quant: str, device: str) -> ExpertWeights:
    """The same experts in a quantized layout (the quantization tool's own
    quantizers), as the experts classes receive them after loading."""
    from vllm.model_executor.quantization.expert_weights import (Fp8ExpertQuant,
                                                                 PackedExpertQuant)
    from vllm.model_executor.quantization.fp8_activation import Fp8ActScheme
    from vllm.tools.quantize import quantize_fp8, quantize_int4
    qs, scales = {}, {}
    group = 128 if min(weights.w2.shape[1:]) % 128 == 0 else 32  # 32 for toy shapes
    for which, w in (("w13", weights.w13), ("w2", weights.w2)):
        parts = []
        for e in range(w.shape[0]):
            if quant == "int4":
                words, scale = quantize_int4(w[e].cpu(), group)
                parts.append((words.view(torch.uint8), scale))  # the same nibbles as bytes
            elif quant == "fp8-channel":
                q, scale = quantize_fp8(w[e], "channel")
                parts.append((q, scale.squeeze(1)))
            else:  # block scales expanded to one row per output row
                q, scale = quantize_fp8(w[e], "block", (128, 128))
                parts.append((q, scale.repeat_interleave(128, 0)[:w.shape[1]]))
        qs[which] = torch.stack([p[0] for p in parts]).to(device)
        scales[which] = torch.stack([p[1] for p in parts]).to(device)
    if quant == "int4":
        payload = PackedExpertQuant("int4", group, scales["w13"], scales["w2"])
    else:
        block = quant == "fp8-block"
        payload = Fp8ExpertQuant(scales["w13"], scales["w2"], 128 if block else None,
                                 Fp8ActScheme("group", 128) if block else Fp8ActScheme("token"))
    return ExpertWeights(qs["w13"], qs["w2"], quant=payload)


def experts_classes(quant: str, backend: str):
    """(the experts class to time, its torch reference)"""
    from vllm.model_executor.layers.fused_moe.experts import torch_quantized, torch_ref
    if quant == "none":
        if backend == "triton":
            from vllm.model_executor.layers.fused_moe.experts.triton import TritonExperts
            return TritonExperts, torch_ref.TorchReferenceExperts
        return torch_ref.TorchReferenceExperts, torch_ref.TorchReferenceExperts
    ref = torch_quantized.TorchWeightOnlyExperts if quant == "int4" \
        else torch_quantized.TorchFp8Experts
    if backend != "triton":
        return ref, ref
    if quant == "int4":
        from vllm.model_executor.layers.fused_moe.experts.triton_weight_only import (
            TritonWeightOnlyExperts)
        return TritonWeightOnlyExperts, ref
    from vllm.model_executor.layers.fused_moe.experts.triton_fp8 import TritonFp8Experts
    return TritonFp8Experts, ref


def random_tensor_fn(device: str, dtype: torch.dtype, seed: int):
    """rnd(*shape, scale): seeded normal values, drawn on the device (fast
    for multi-GB expert weights)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)
    return rnd


@functools.lru_cache(maxsize=1)  # the rows of one shape share their experts
def expert_weights(shape: str, device: str, dtype: torch.dtype, quant: str,
                   seed: int) -> ExpertWeights:
    H, I, E, _ = SHAPES[shape]
    rnd = random_tensor_fn(device, dtype, seed)
    weights = ExpertWeights(rnd(E, 2 * I, H, scale=H ** -0.5), rnd(E, H, I, scale=I ** -0.5))
    return weights if quant == "none" else quantize_experts(weights, quant, device)


def build(case: Case, backend: str, device: str, dtype: torch.dtype, seed: int = 0,
          quant: str = "none", fusion: str = "auto"):
    H, I, E, k = SHAPES[case.shape]
    rnd = random_tensor_fn(device, dtype, seed + 1)
    scheme = {"none": "unquantized", "int4": "int4"}.get(quant, "fp8")
    cfg = FusedMoEConfig(num_experts=E, num_local_experts=E, top_k=k, hidden_size=H,
                         intermediate_size=I, activation=MoEActivation(), has_bias=False,
                         dtype=dtype, device=device, quant_scheme=scheme)
    weights = expert_weights(case.shape, device, dtype, quant, seed)
    x = rnd(case.tokens, H, scale=1.0)
    logits = rnd(case.tokens, E, scale=1.0).float()
    topk_weights, topk_ids = select_experts(logits, RouterConfig(k, renormalize=True))
    L, R = case.adapters, case.rank
    ctx_tensors = dict(
        w13_lora_a=[rnd(L, E, R, H, scale=H ** -0.5) for _ in range(2)],
        w13_lora_b=[rnd(L, E, I, R, scale=0.05) for _ in range(2)],
        w2_lora_a=rnd(L, E, R, I, scale=I ** -0.5), w2_lora_b=rnd(L, E, H, R, scale=0.05))
    slots = [t % L for t in range(case.tokens)]
    if backend == "triton":
        from vllm.lora.punica_wrapper.triton_wrapper import TritonPunicaWrapper
        punica = TritonPunicaWrapper(L, torch.device(device), moe_lora_fusion=fusion)
    else:
        from vllm.lora.punica_wrapper.torch_wrapper import TorchPunicaWrapper
        punica = TorchPunicaWrapper(L, torch.device(device))
    punica.update_mapping(slots)
    ctx = MoELoRAContext(**ctx_tensors, adapter_enabled=torch.ones(L, dtype=torch.int32,
                                                                    device=device),
                         max_loras=L, top_k=k, w13_num_slices=2, w13_slice_offsets=[0, I],
                         punica=punica)
    experts_cls, _ = experts_classes(quant, backend)
    return cfg, experts_cls(cfg), weights, x, topk_weights, topk_ids, ctx, slots


def bytes_moved(case: Case, topk_ids: torch.Tensor, slots: list[int], elem: int,
                weight_bytes: float | None = None) -> tuple[int, int]:
    """Bytes a bandwidth-bound layer must read or write; expert weights at
    ``weight_bytes`` per value (quantized formats), LoRA factors at ``elem``."""
    H, I, E, k = SHAPES[case.shape]
    ids = topk_ids.cpu().long()
    experts = set(ids.flatten().tolist())
    pairs = {(slots[t], int(e)) for t in range(ids.shape[0]) for e in ids[t]}
    base = int(len(experts) * 3 * H * I * (weight_bytes or elem)) + 2 * case.tokens * H * elem
    lora = len(pairs) * case.rank * 3 * (H + I) * elem
    return base, lora


def check(case, backend, device, dtype, quant: str = "none", fusion: str = "auto") -> float:
    """Relative error of backend + LoRA against the torch reference (the
    torch experts of the same weight format, LoRA through torch ops)."""
    from vllm.lora.punica_wrapper.torch_wrapper import TorchPunicaWrapper
    cfg, experts, w, x, tw, ids, ctx, slots = build(case, backend, device, dtype, quant=quant,
                                                    fusion=fusion)
    out = torch.full_like(x, float("nan"))
    experts.apply(out, x, w, tw, ids, lora_context=ctx)
    ref_punica = TorchPunicaWrapper(ctx.max_loras, torch.device(device))
    ref_punica.update_mapping(slots)
    ref_ctx = MoELoRAContext(**{**ctx.__dict__, "punica": ref_punica})
    up = dict(dtype=torch.float32)
    ref_ctx.w13_lora_a = [t.to(**up) for t in ctx.w13_lora_a]
    ref_ctx.w13_lora_b = [t.to(**up) for t in ctx.w13_lora_b]
    ref_ctx.w2_lora_a, ref_ctx.w2_lora_b = ctx.w2_lora_a.to(**up), ctx.w2_lora_b.to(**up)
    if quant == "none":
        ref_w = ExpertWeights(w.w13.to(**up), w.w2.to(**up))
    else:
        ref_w = w  # quantized payloads dequantize to float32 in the torch class
    ref = torch.empty_like(x, **up)
    _, ref_cls = experts_classes(quant, backend)
    ref_cls(cfg).apply(ref, x.to(**up), ref_w, tw, ids, lora_context=ref_ctx)
    return ((out.float() - ref).norm() / ref.norm()).item()


def copy_bandwidth(device: str) -> float:
    """Device copy bandwidth in bytes/s (read + write), measured now."""
    if device != "cuda":
        return float("nan")
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = time_fn(lambda: b.copy_(a), "eager", device, 10)
    return 2 * a.numel() / (ms / 1e3)


def kernel_breakdown(fn, iters: int, rows: int) -> str:
    """Device time per call of the kernels ``fn`` launches (eager, warm L2)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:rows]
    return "\n".join(f"    {e.self_device_time_total / iters:9.1f} us {e.count / iters:5.1f}x  "
                     f"{e.key[:72]}" for e in events)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["qwen3-30b-a3b", "mixtral-8x7b", "gpt-oss-20b"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 512, 2048, 8192])
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--backend", default=None, help="triton (GPU default) or torch (CPU default)")
    p.add_argument("--mode", nargs="+", default=["graph", "eager"], choices=["graph", "eager"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--tolerance", type=float, default=2e-2)
    p.add_argument("--quant", default="none", choices=QUANT_SCHEMES,
                   help="expert weight format (LoRA factors stay in --dtype)")
    p.add_argument("--fusion", nargs="+", default=["auto"],
                   choices=["auto", "gemm", "epilogue", "loop", "off"],
                   help="where the Triton experts compute LoRA (VLLM_MOE_LORA_FUSION); "
                        "several values are timed side by side")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after each LoRA row, the ROWS kernels with the most device time")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = args.backend or ("triton" if device == "cuda" else "torch")
    dtype = getattr(torch, args.dtype) if device == "cuda" else torch.float32
    cases = [Case(s, t, a, r) for s in args.shapes for r in args.ranks for a in args.adapters
             for t in args.tokens]

    failures = []
    for case in cases:
        for fusion in args.fusion:
            err = check(Case(case.shape, min(case.tokens, 64), case.adapters, case.rank), backend,
                        device, dtype, args.quant, fusion)
            if not err < args.tolerance:
                failures.append(f"{case} fusion {fusion}: relative error {err:.3e}")
    if failures:
        print("MISMATCH against the torch reference:\n" + "\n".join(failures))
        sys.exit(1)
    print(f"correctness: {len(cases)} configurations within {args.tolerance} of the reference")

    bw = copy_bandwidth(device)
    elem = torch.empty((), dtype=dtype).element_size()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\ndevice {name} | backend {backend} | experts {args.quant} | "
          f"{str(dtype).replace('torch.', '')} | copy bandwidth "
          f"{bw / 1e12:.2f} TB/s (read + write)")
    header = (f"{'shape':<15}{'mode':<7}{'fusion':<9}{'tok':>6}{'ad':>4}{'r':>4}{'base ms':>9}"
              f"{'+lora ms':>10}"
              f"{'retain':>8}{'ceiling':>8}{'MB base':>9}{'MB lora':>9}{'bw base':>8}{'bw all':>8}")
    print(header)
    for mode in args.mode:
        for case in cases:
            cfg, experts, w, x, tw, ids, ctx, slots = build(case, backend, device, dtype,
                                                            quant=args.quant)
            out = torch.empty_like(x)
            base_ms = time_fn(lambda: experts.apply(out, x, w, tw, ids), mode, device, args.iters)
            weight_bytes = {"none": None, "int4": 0.5}.get(args.quant, 1.0)
            base_b, lora_b = bytes_moved(case, ids, slots, elem, weight_bytes)
            frac = lambda nbytes, ms: nbytes / (ms / 1e3) / bw  # noqa: E731
            for fusion in args.fusion:
                if backend == "triton":
                    ctx.punica.moe_lora_fusion = fusion
                lora_ms = time_fn(lambda: experts.apply(out, x, w, tw, ids, lora_context=ctx),
                                  mode, device, args.iters)
                print(f"{case.shape:<15}{mode:<7}{fusion:<9}{case.tokens:>6}{case.adapters:>4}"
                      f"{case.rank:>4}{base_ms:>9.3f}{lora_ms:>10.3f}{base_ms / lora_ms:>8.2f}"
                      f"{base_b / (base_b + lora_b):>8.2f}{base_b / 1e6:>9.1f}"
                      f"{lora_b / 1e6:>9.2f}{frac(base_b, base_ms):>8.2f}"
                      f"{frac(base_b + lora_b, lora_ms):>8.2f}")
                if args.profile and device == "cuda":
                    print(kernel_breakdown(
                        lambda: experts.apply(out, x, w, tw, ids, lora_context=ctx),
                        args.iters, args.profile))


if __name__ == "__main__":
    main()
