"""Measured error of every Triton kernel against its torch reference, as a
table (max absolute error and norm-relative error), in bf16 on a GPU (or
float32 under Triton's interpreter on the CPU). Exits non-zero when an
error exceeds its bound.

    python benchmarks/kernels/kernel_errors.py
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from vllm.lora.ops import torch_ops  # noqa: E402
from vllm.lora.token_mapping import LoRATokenMapping  # noqa: E402
from vllm.model_executor.layers.attention.backend import AttentionMetadata  # noqa: E402
from vllm.model_executor.layers.attention.torch_ref import TorchAttentionBackend  # noqa: E402
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, MoEActivation  # noqa: E402
from vllm.model_executor.layers.fused_moe.experts.base import ExpertWeights  # noqa: E402
from vllm.model_executor.layers.fused_moe.experts.torch_ref import TorchReferenceExperts  # noqa: E402
from vllm.model_executor.layers.fused_moe.moe_align import (  # noqa: E402
    moe_align_block_size_torch, moe_lora_align_block_size_torch)


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = (out.double() - ref.double())
    return d.abs().max().item(), (d.norm() / ref.double().norm()).item()


def attention_case(device, dtype, g, heads=8, kv_heads=2, head=128, window=None, sinks=False):
    from vllm.model_executor.layers.attention.triton_paged import TritonAttentionBackend
    bs, blocks = 16, 64
    seqs = [(300, 300), (170, 1), (90, 17), (1000, 1)]  # (total length, new tokens)
    cache = (torch.randn(2, blocks * 4, bs, kv_heads, head, generator=g) * 0.5).to(device, dtype)
    perm = torch.randperm(blocks * 4, generator=g)
    tables, qsl, slots, used = [], [0], [], 0
    for total, new in seqs:
        n = -(-total // bs)
        table = perm[used:used + n].tolist()
        used += n
        tables.append(table + [0] * (blocks - n))
        qsl.append(qsl[-1] + new)
        slots += [table[p // bs] * bs + p % bs for p in range(total - new, total)]
    T = qsl[-1]
    q = torch.randn(T, heads, head, generator=g).to(device, dtype)
    k = torch.randn(T, kv_heads, head, generator=g).to(device, dtype)
    v = torch.randn(T, kv_heads, head, generator=g).to(device, dtype)
    meta = AttentionMetadata(len(seqs), T, torch.tensor(qsl, dtype=torch.int32, device=device),
                             torch.tensor([s for s, _ in seqs], dtype=torch.int32, device=device),
                             torch.tensor(tables, dtype=torch.int32, device=device),
                             torch.tensor(slots, device=device), max(n for _, n in seqs),
                             qsl, [s for s, _ in seqs])
    sink = (torch.randn(heads, generator=g) * 2).to(device, dtype) if sinks else None
    out = TritonAttentionBackend().forward(q, k, v, cache.clone(), meta, head ** -0.5, window, sink)
    ref = TorchAttentionBackend().forward(q.float(), k.float(), v.float(), cache.float(), meta,
                                          head ** -0.5, window,
                                          None if sink is None else sink.float())
    return errors(out, ref)


def experts_case(device, dtype, g, T=200, E=64, H=1024, I=512, k=8, act=MoEActivation()):
    from vllm.model_executor.layers.fused_moe.experts.triton import TritonExperts
    cfg = FusedMoEConfig(num_experts=E, num_local_experts=E, top_k=k, hidden_size=H,
                         intermediate_size=I, activation=act, has_bias=True, dtype=dtype,
                         device=device)
    w = ExpertWeights(*(t.to(device, dtype) for t in (
        torch.randn(E, 2 * I, H, generator=g) * H ** -0.5, torch.randn(E, H, I, generator=g) *
        I ** -0.5, torch.randn(E, 2 * I, generator=g) * 0.1, torch.randn(E, H, generator=g) * 0.1)))
    x = torch.randn(T, H, generator=g).to(device, dtype)
    weights, ids = torch.rand(T, E, generator=g).softmax(-1).topk(k)
    weights, ids = weights.to(device), ids.to(torch.int32).to(device)
    out = torch.full_like(x, float("nan"))
    TritonExperts(cfg).apply(out, x, w, weights, ids)
    ref = torch.empty(T, H, device=device)
    f32 = ExpertWeights(*(t.float() for t in (w.w13, w.w2, w.w13_bias, w.w2_bias)))
    TorchReferenceExperts(FusedMoEConfig(**{**cfg.__dict__, "dtype": torch.float32})).apply(
        ref, x.float(), f32, weights, ids)
    return errors(out, ref)


def align_case(device, g):
    from vllm.model_executor.layers.fused_moe.kernels.moe_align_triton import (
        moe_align_block_size_triton, moe_lora_align_block_size_triton)
    ids = torch.rand(517, 128, generator=g).topk(8).indices.to(torch.int32).to(device)
    slots = torch.randint(-1, 4, (517,), generator=g).to(device)
    same = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(
        moe_align_block_size_triton(ids, 16, 128), moe_align_block_size_torch(ids, 16, 128)))
    same &= all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(
        moe_lora_align_block_size_triton(ids, slots, 16, 128, 4),
        moe_lora_align_block_size_torch(ids, slots, 16, 128, 4)))
    return (0.0, 0.0) if same else (float("inf"), float("inf"))


def lora_linear_case(device, dtype, g, T=96, K=2048, R=16, L=4, slices=(2048, 512, 512)):
    from vllm.lora.ops.triton_ops.lora_ops import lora_expand, lora_shrink
    x = torch.randn(T, K, generator=g).to(device, dtype)
    a = [(torch.randn(L, R, K, generator=g) * K ** -0.5).to(device, dtype) for _ in slices]
    b = [(torch.randn(L, n, R, generator=g) * 0.1).to(device, dtype) for n in slices]
    mapping = LoRATokenMapping.build(torch.randint(-1, L, (T,), generator=g).to(device), L)
    offsets = [0, slices[0], slices[0] + slices[1]]
    y = torch.randn(T, sum(slices), generator=g).to(device, dtype)
    ref = y.float().clone()
    inter = torch.zeros(len(slices), T, R, device=device)
    lora_shrink(x, a, mapping, inter)
    lora_expand(inter, b, mapping, y, offsets)
    ref_inter = torch.zeros(len(slices), T, R, device=device)
    torch_ops.lora_shrink(x.float(), [t.float() for t in a], mapping, ref_inter)
    torch_ops.lora_expand(ref_inter, [t.float() for t in b], mapping, ref, offsets)
    return errors(y, ref)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bound = 2e-2 if dtype == torch.bfloat16 else 1e-4
    g = torch.Generator().manual_seed(0)
    rows = [
        ("attention GQA 8/2, head 128", attention_case(device, dtype, g)),
        ("attention + window 128 + sinks", attention_case(device, dtype, g, window=128, sinks=True)),
        ("attention head 64, GQA 8/8", attention_case(device, dtype, g, kv_heads=8, head=64)),
        ("MoE experts silu (E64 H1024 I512 k8)", experts_case(device, dtype, g)),
        ("MoE experts swigluoai interleaved", experts_case(
            device, dtype, g, act=MoEActivation("swigluoai", interleaved=True))),
        ("moe_align + LoRA align (bit-exact)", align_case(device, g)),
        ("LoRA shrink+expand qkv (r16, 4 slots)", lora_linear_case(device, dtype, g)),
    ]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    print(f"\n{name} | {str(dtype).removeprefix('torch.')} vs float32 torch reference | "
          f"bound {bound:g} (relative)")
    print(f"{'kernel':<42}{'max abs err':>14}{'rel err':>12}")
    failed = False
    for label, (max_abs, rel) in rows:
        failed |= not rel <= bound
        print(f"{label:<42}{max_abs:>14.3e}{rel:>12.3e}{'' if rel <= bound else '  FAIL'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
