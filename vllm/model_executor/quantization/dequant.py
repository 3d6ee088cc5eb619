"""Torch references for every quantized weight format the engine reads.

One function per format, shared by the quant methods (CPU path, dense
fallbacks), the torch reference experts and the Triton kernels' tests:

- FP8 E4M3 with a per-tensor, per-channel or 2-D block scale
  (``w = q * s``; HF ``fp8`` calls the block scale ``weight_scale_inv``
  although it multiplies);
- FP4 E2M1 codes packed two per byte, low nibble first (element ``2j`` in
  bits 0-3 of byte ``j``), with a group scale: E4M3 per 16 values and a
  per-tensor global multiplier (NVFP4) or E8M0 (``2**(s - 127)``) per 32
  values (MXFP4);
- symmetric INT4 packed eight per int32 word, element ``k`` in bits
  ``4 * (k % 8)`` of word ``k // 8`` and stored with an offset of 8
  (compressed-tensors ``pack-quantized``), with a group scale. Viewed as
  bytes on a little-endian host this is the same nibble order as FP4, so
  both are kept as ``uint8 [..., K / 2]`` after loading.
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0

# E2M1 code -> value (bit 3 is the sign)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int],
                       block: tuple[int, int]) -> torch.Tensor:
    """A ``[..., ceil(N / bn), ceil(K / bk)]`` block scale broadcast to
    ``[..., N, K]`` (trailing partial blocks cut off)."""
    n, k = shape
    bn, bk = block
    return scale.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor,
                block: tuple[int, int] | None = None) -> torch.Tensor:
    """float32 values of an FP8 weight ``[..., N, K]``. ``scale`` is a
    scalar (per tensor), ``[..., N]`` or ``[..., N, 1]`` (per channel) or,
    with ``block``, ``[..., ceil(N / bn), ceil(K / bk)]``."""
    w = weight.float()
    scale = scale.float()
    if block is not None:
        return w * expand_block_scale(scale, tuple(w.shape[-2:]), block)
    if scale.numel() == 1:
        return w * scale.reshape(())
    if scale.dim() == w.dim() - 1:
        scale = scale.unsqueeze(-1)
    return w * scale


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., K / 2]`` -> int64 codes ``[..., K]``, low nibble first."""
    b = packed.view(torch.uint8).long()
    return torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)[codes]


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 exponents (uint8) -> ``2 ** (s - 127)``."""
    exp = scale.view(torch.uint8).to(torch.int32) - 127
    return torch.ldexp(torch.ones(exp.shape, device=scale.device), exp)


def e4m3_to_float(scale: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 scales given as float8_e4m3fn or their raw uint8 bytes."""
    if scale.dtype == torch.uint8:
        scale = scale.view(FP8_DTYPE)
    return scale.float()


def _group_expand(scale: torch.Tensor, group: int, k: int) -> torch.Tensor:
    return scale.repeat_interleave(group, dim=-1)[..., :k]


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, group: int, scale_format: str,
                global_scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """float32 values of packed E2M1 ``[..., N, K / 2]`` with group scales
    ``[..., N, K / group]`` in ``scale_format`` "e4m3" (NVFP4, times the
    ``global_scale`` multiplier, broadcast over the leading dims) or "e8m0"
    (MXFP4)."""
    values = e2m1_to_float(unpack_nibbles(packed))
    if scale_format == "e4m3":
        s = e4m3_to_float(scale)
    elif scale_format == "e8m0":
        s = e8m0_to_float(scale)
    else:
        raise ValueError(f"unknown FP4 scale format {scale_format!r}")
    out = values * _group_expand(s, group, values.shape[-1])
    if global_scale is not None:
        g = torch.as_tensor(global_scale, dtype=torch.float32, device=out.device)
        out = out * g.reshape(g.shape + (1,) * (out.dim() - g.dim()))
    return out


def int32_words_to_bytes(packed: torch.Tensor) -> torch.Tensor:
    """compressed-tensors int32 words ``[..., K / 8]`` -> uint8 ``[..., K / 2]``
    in the shared low-nibble-first order (little-endian byte view)."""
    return packed.contiguous().view(torch.uint8)


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """float32 values of symmetric INT4 ``[..., N, K / 2]`` bytes (or the
    int32 words they came from) with group scales ``[..., N, K / group]``."""
    if packed.dtype == torch.int32:
        packed = int32_words_to_bytes(packed)
    q = (unpack_nibbles(packed) - 8).float()
    return q * _group_expand(scale.float(), group, q.shape[-1])
