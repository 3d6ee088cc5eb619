"""``act(gate) * up`` over the w13 GEMM's output in one pass.

torch spells the gated activation as two elementwise kernels (six for
GPT-OSS's clamped SwiGLU), each a full pass over memory; at thousands of
tokens those passes cost as much as a tenth of the MoE layer. This kernel
reads gate and up once, computes in fp32 and rounds once. Reference:
``vllm.model_executor.layers.activation.gated_activation``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

KINDS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "swigluoai")


@triton.jit
def _gated_activation_kernel(x_ptr, out_ptr, N, stride_xm, stride_om, alpha, limit,
                             KIND: tl.constexpr, INTERLEAVED: tl.constexpr,
                             HAS_LIMIT: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
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
    tl.store(out_ptr + row * stride_om + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def gated_activation_triton(x: torch.Tensor, kind: str = "silu", interleaved: bool = False,
                            alpha: float = 1.702, limit: float | None = 7.0) -> torch.Tensor:
    """``gated_activation`` of a 2D ``x`` ``[M, 2N]`` -> ``[M, N]`` in x's dtype."""
    if kind not in KINDS:
        raise ValueError(f"unsupported activation {kind!r}")
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError(f"expected a row-major [M, 2N] input, got {tuple(x.shape)}")
    M, N = x.shape[0], x.shape[1] // 2
    out = x.new_empty(M, N)
    if M == 0:
        return out
    block_n = min(triton.next_power_of_2(N), 2048)
    _gated_activation_kernel[(M, triton.cdiv(N, block_n))](
        x, out, N, x.stride(0), out.stride(0), alpha, limit if limit is not None else math.inf,
        KIND=kind, INTERLEAVED=interleaved, HAS_LIMIT=limit is not None, BLOCK_N=block_n,
        num_warps=4)
    return out
