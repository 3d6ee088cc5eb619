"""``act(gate) * up`` over the w13 GEMM's output in one pass.

torch spells the gated activation as two elementwise kernels (six for
GPT-OSS's clamped SwiGLU), each a full pass over memory; at thousands of
tokens those passes cost as much as a tenth of the MoE layer. This kernel
reads gate and up once, computes in fp32 and rounds once. Reference:
``vllm.model_executor.layers.activation.gated_activation``.

With few pairs it also computes the w2 LoRA shrink of the rows it writes
(``MoELoRAPairShrink``): at decode the shrink kernel after it was one more
launch and chain of dependent reads on the critical path, for a few KB.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm.lora.ops.triton_ops.fused_moe_lora import (MoELoRAPairShrink, pair_factor_chunk,
                                                     pair_shrink_block, pair_shrink_kernel_args,
                                                     pair_slot_expert)

KINDS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "swigluoai")


@triton.jit
def _gated_activation_kernel(x_ptr, out_ptr, N, stride_xm, stride_om, alpha, limit,
                             lora_w_ptr, lora_out_ptr, lora_topk_ids_ptr, lora_slot_ptr,
                             lora_enabled_ptr, lora_rank, stride_lwl, stride_lwe,
                             stride_lwr, stride_lwk, stride_lo_part, stride_lo_p,
                             KIND: tl.constexpr, INTERLEAVED: tl.constexpr,
                             HAS_LIMIT: tl.constexpr, BLOCK_N: tl.constexpr, LORA: tl.constexpr,
                             LORA_TOP_K: tl.constexpr, LORA_BLOCK_R: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    if LORA:  # row is a pair; its factor chunk first, to overlap the loads below
        slot, expert, routed, on = pair_slot_expert(row, lora_topk_ids_ptr, lora_slot_ptr,
                                                    lora_enabled_ptr, LORA_TOP_K)
        w = pair_factor_chunk(lora_w_ptr + slot * stride_lwl + expert * stride_lwe, cols,
                              mask & routed, lora_rank, stride_lwr, stride_lwk, LORA_BLOCK_R)
    x_row = x_ptr + row * stride_xm
    if INTERLEAVED:
        gate = tl.load(x_row + 2 * cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + 2 * cols + 1, mask=mask, other=0.0).to(tl.float32)
    else:
        gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + N + cols, mask=mask, other=0.0).to(tl.float32)
    if KIND == "swigluoai":
        if HAS_LIMIT:
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
        y = (up + 1.0) * gate * tl.sigmoid(gate * alpha)
    elif KIND == "gelu":
        y = 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)) * up
    elif KIND == "gelu_pytorch_tanh":
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        # tanh(z) = 2 sigmoid(2z) - 1
        y = gate * tl.sigmoid(2.0 * inner) * up
    else:  # silu / swish
        y = gate * tl.sigmoid(gate) * up
    y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_om + cols, y, mask=mask)
    if LORA:  # the shrink reads y as stored, as a kernel after this one would
        u = tl.sum(w.to(tl.float32) * tl.where(mask, y.to(tl.float32), 0.0)[None, :], axis=1)
        offs_r = tl.arange(0, LORA_BLOCK_R)
        tl.store(lora_out_ptr + tl.program_id(1) * stride_lo_part + row * stride_lo_p + offs_r,
                 u, mask=(offs_r < lora_rank) & on)


NO_LORA_KERNEL_ARGS = dict(
    lora_w_ptr=None, lora_out_ptr=None, lora_topk_ids_ptr=None, lora_slot_ptr=None,
    lora_enabled_ptr=None, lora_rank=0, LORA_TOP_K=1, stride_lwl=0, stride_lwe=0, stride_lwr=0,
    stride_lwk=0, stride_lo_part=0, stride_lo_p=0, LORA=False, LORA_BLOCK_R=16)


def gated_activation_triton(x: torch.Tensor, kind: str = "silu", interleaved: bool = False,
                            alpha: float = 1.702, limit: float | None = 7.0,
                            lora_shrink: MoELoRAPairShrink | None = None) -> torch.Tensor:
    """``gated_activation`` of a 2D ``x`` ``[M, 2N]`` -> ``[M, N]`` in x's dtype.
    ``lora_shrink``: rows are (token, expert) pairs; also write each pair's
    shrink of its output row, as ``fused_moe_lora_shrink_by_pair`` would."""
    if kind not in KINDS:
        raise ValueError(f"unsupported activation {kind!r}")
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError(f"expected a row-major [M, 2N] input, got {tuple(x.shape)}")
    M, N = x.shape[0], x.shape[1] // 2
    out = x.new_empty(M, N)
    if M == 0:
        return out
    block_n = min(triton.next_power_of_2(N), 2048)
    lora_args = NO_LORA_KERNEL_ARGS
    if lora_shrink is not None:
        lora_args = pair_shrink_kernel_args(lora_shrink, M, N)
        block_n = pair_shrink_block(lora_shrink.lora_a.shape[2])
    _gated_activation_kernel[(M, triton.cdiv(N, block_n))](
        x, out, N, x.stride(0), out.stride(0), alpha, limit if limit is not None else math.inf,
        **lora_args, KIND=kind, INTERLEAVED=interleaved, HAS_LIMIT=limit is not None,
        BLOCK_N=block_n, num_warps=4)
    return out
