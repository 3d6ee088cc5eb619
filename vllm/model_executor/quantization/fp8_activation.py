"""FP8 activation quantization for W8A8 GEMMs.

Schemes (``Fp8ActScheme.kind``):
- ``"token"``: dynamic, one scale per row (``amax(row) / 448``);
- ``"group"``: dynamic, one scale per row and ``group_size`` columns (HF
  ``fp8`` checkpoints: the weight block's K size);
- ``"tensor"``: dynamic, one scale for the whole tensor;
- ``"static"``: the checkpoint's calibrated scale.

Only the base GEMM reads the quantized copy: LoRA always reads the
unquantized activations the quantized copy was made from.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm.model_executor.quantization.dequant import FP8_DTYPE, FP8_MAX

_MIN_SCALE = 1e-12


@dataclass(frozen=True)
class Fp8ActScheme:
    kind: str                 # "token", "group", "tensor" or "static"
    group_size: int = 0       # "group" only

    def __post_init__(self):
        if self.kind not in ("token", "group", "tensor", "static"):
            raise ValueError(f"unknown FP8 activation scheme {self.kind!r}")
        if self.kind == "group" and self.group_size <= 0:
            raise ValueError("per-token-group FP8 activations need a positive group size")


def fp8_act_scales(x: torch.Tensor, scheme: Fp8ActScheme,
                   static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """float32 scales of ``x [M, K]``: ``[1]``, ``[M, 1]`` or ``[M, ceil(K / g)]``."""
    if scheme.kind == "static":
        if static_scale is None:
            raise ValueError("static FP8 activation quantization needs the checkpoint's "
                             "input scale")
        return static_scale.float().reshape(1)
    xa = x.abs().float()
    if scheme.kind == "tensor":
        amax = xa.amax().reshape(1)
    elif scheme.kind == "token":
        amax = xa.amax(dim=-1, keepdim=True)
    else:
        m, k = x.shape
        g = scheme.group_size
        pad = -k % g
        if pad:
            xa = torch.nn.functional.pad(xa, (0, pad))
        amax = xa.view(m, -1, g).amax(dim=-1)
    return amax.clamp(min=_MIN_SCALE) / FP8_MAX


def _broadcast_scale(scale: torch.Tensor, x: torch.Tensor, scheme: Fp8ActScheme) -> torch.Tensor:
    if scheme.kind == "group":
        return scale.repeat_interleave(scheme.group_size, dim=-1)[:, :x.shape[-1]]
    return scale if scale.dim() == 2 else scale.reshape(1, 1)


def quantize_fp8_act(x: torch.Tensor, scheme: Fp8ActScheme,
                     static_scale: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``q`` float8_e4m3fn ``[M, K]`` and ``x ~= q * scale``."""
    scale = fp8_act_scales(x, scheme, static_scale)
    q = (x.float() / _broadcast_scale(scale, x, scheme)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8_act(q: torch.Tensor, scale: torch.Tensor, scheme: Fp8ActScheme) -> torch.Tensor:
    return q.float() * _broadcast_scale(scale, q, scheme)


def fake_quantize_fp8_act(x: torch.Tensor, scheme: Fp8ActScheme,
                          static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` rounded through FP8 exactly as the W8A8 GEMMs see it, in x's dtype."""
    q, scale = quantize_fp8_act(x, scheme, static_scale)
    return dequantize_fp8_act(q, scale, scheme).to(x.dtype)
