"""Grouped expert GEMM with 4-bit weights dequantized on the fly against
unquantized (bf16 / fp16 / fp32) activations: the role Marlin plays
upstream, in Triton.

Same pair conventions as ``fused_moe_gemm``. B is 4-bit codes packed two
per byte, ``uint8 [E, N, K / 2]``, low nibble first; group scales are
``[E, N, K / group]``. ``WEIGHT_FORMAT``:
- 0, INT4: ``(code - 8) * scale`` with float scales (compressed-tensors
  ``pack-quantized``, symmetric);
- 1, NVFP4: ``e2m1(code) * e4m3(scale)`` (scales as raw bytes), group 16;
- 2, MXFP4: ``e2m1(code) * 2 ** (scale - 127)`` (E8M0 bytes), group 32.
An optional float32 per-row multiplier (NVFP4's global scale) is applied
after the K loop. Decoding uses integer and float ops only, so the kernel
also runs in Triton's interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm.model_executor.layers.fused_moe.kernels.moe_tile import moe_tile, moe_tile_store

from vllm.model_executor.layers.fused_moe.kernels.fused_moe_gemm import (
    _alignment_block_size, aligned_pairs_by_expert, default_config, store_pair_rows)
from vllm.model_executor.quantization.dequant import dequant_fp4, dequant_int4

WEIGHT_FORMATS = {"int4": 0, "nvfp4": 1, "mxfp4": 2}


@triton.jit
def _e2m1_to_f32(code):
    mag = code & 7
    e = mag >> 1
    m = (mag & 1).to(tl.float32)
    pow2 = tl.where(e == 3, 4.0, tl.where(e == 2, 2.0, 1.0))
    v = tl.where(e == 0, 0.5 * m, pow2 * (1.0 + 0.5 * m))
    return tl.where((code & 8) != 0, -v, v)


@triton.jit
def _e4m3_to_f32(byte):
    b = byte.to(tl.int32)
    exp = (b >> 3) & 15
    mant = b & 7
    normal = (((exp + 120) << 23) | (mant << 20)).to(tl.float32, bitcast=True)
    v = tl.where(exp == 0, mant.to(tl.float32) * 0.001953125, normal)  # subnormal: m * 2**-9
    return tl.where((b & 128) != 0, -v, v)


@triton.jit
def _e8m0_to_f32(byte):
    b = byte.to(tl.int32)
    # 2**(b - 127); b == 0 is the subnormal 2**-127
    return tl.where(b == 0, 5.877471754111438e-39, (b << 23).to(tl.float32, bitcast=True))


@triton.jit
def _fused_moe_weight_only_kernel(
        a_ptr, b_ptr, s_ptr, cs_ptr, c_ptr, bias_ptr, topk_weights_ptr,
        sorted_pair_ids_ptr, expert_ids_ptr, num_pairs_post_padded_ptr,
        N, K, num_valid_pairs, num_padded_pairs, group_size,
        stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_se, stride_sn, stride_sk,
        stride_cse, stride_csn, stride_cm, stride_cn, stride_bias_e, stride_bias_n,
        TOP_K: tl.constexpr, WEIGHT_FORMAT: tl.constexpr, GATHER_ROWS: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_CHANNEL_SCALE: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
        BLOCK_SIZE_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr, SCALE_ROWS: tl.constexpr):
    active, expert, pair, pair_mask, row, offs_n, n_mask = moe_tile(
        tl.program_id(0), num_padded_pairs, num_pairs_post_padded_ptr, expert_ids_ptr,
        sorted_pair_ids_ptr, num_valid_pairs, TOP_K, N, GATHER_ROWS, BLOCK_SIZE_M, BLOCK_SIZE_N,
        GROUP_SIZE_M)
    if not active:
        return
    # Each packed byte holds weights k = 2j (low nibble) and 2j + 1 (high):
    # the K loop reads BLOCK_K / 2 contiguous bytes per column and splits
    # the activation tile into its even and odd columns to match, so nothing
    # is interleaved in registers and the loads stay vectorised.
    HALF_K: tl.constexpr = BLOCK_SIZE_K // 2
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    offs_j = tl.arange(0, HALF_K)
    offs_g = tl.arange(0, SCALE_ROWS)
    a_ptrs = a_ptr + row[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_j[:, None] * stride_bk
    s_base = s_ptr + expert * stride_se + offs_n[None, :] * stride_sn
    num_groups = tl.cdiv(K, group_size)
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        k_mask = kb * BLOCK_SIZE_K + offs_k < K
        a = tl.load(a_ptrs, mask=pair_mask[:, None] & k_mask[None, :], other=0.0)
        a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_SIZE_M, HALF_K, 2)))
        j_mask = kb * HALF_K + offs_j < K // 2
        byte = tl.load(b_ptrs, mask=j_mask[:, None] & n_mask[None, :], other=0).to(tl.int32)
        # the tile spans SCALE_ROWS whole groups, or lies inside one
        g = (kb * BLOCK_SIZE_K) // group_size + offs_g
        scale = tl.load(s_base + g[:, None] * stride_sk,
                        mask=(g < num_groups)[:, None] & n_mask[None, :], other=0)
        if WEIGHT_FORMAT == 0:
            lo = ((byte & 15) - 8).to(tl.float32)
            hi = ((byte >> 4) - 8).to(tl.float32)
            scale = scale.to(tl.float32)
        elif WEIGHT_FORMAT == 1:
            lo, hi = _e2m1_to_f32(byte & 15), _e2m1_to_f32(byte >> 4)
            scale = _e4m3_to_f32(scale)
        else:
            lo, hi = _e2m1_to_f32(byte & 15), _e2m1_to_f32(byte >> 4)
            scale = _e8m0_to_f32(scale)
        scale = scale[:, None, :]
        lo = tl.reshape(tl.reshape(lo, (SCALE_ROWS, HALF_K // SCALE_ROWS, BLOCK_SIZE_N)) * scale,
                        (HALF_K, BLOCK_SIZE_N))
        hi = tl.reshape(tl.reshape(hi, (SCALE_ROWS, HALF_K // SCALE_ROWS, BLOCK_SIZE_N)) * scale,
                        (HALF_K, BLOCK_SIZE_N))
        acc = tl.dot(a_even, lo.to(a.dtype), acc, input_precision=INPUT_PRECISION)
        acc = tl.dot(a_odd, hi.to(a.dtype), acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_SIZE_K * stride_ak
        b_ptrs += HALF_K * stride_bk

    if HAS_CHANNEL_SCALE:
        cs = tl.load(cs_ptr + expert * stride_cse + offs_n * stride_csn, mask=n_mask, other=0.0)
        acc *= cs[None, :]
    moe_tile_store(acc, c_ptr, bias_ptr, topk_weights_ptr, expert, pair, pair_mask, offs_n, n_mask,
                   stride_cm, stride_cn, stride_bias_e, stride_bias_n, HAS_BIAS, MUL_ROUTED_WEIGHT)


def _check(a, b, scale, c, group_size):
    E, N, half_k = b.shape
    K = a.shape[1]
    if b.dtype != torch.uint8 or half_k * 2 != K or c.shape[1] != N:
        raise ValueError(f"shapes do not chain: a {tuple(a.shape)}, packed b "
                         f"{tuple(b.shape)} {b.dtype}, c {tuple(c.shape)}")
    if scale.shape != (E, N, -(-K // group_size)):
        raise ValueError(f"group scales {tuple(scale.shape)} do not fit {(E, N, K)} in groups "
                         f"of {group_size}")


def kernel_supports_group(group_size: int) -> bool:
    """The kernel's K tiles hold whole groups or lie inside one: group sizes
    are powers of two from 16 (every format on disk uses 16, 32 or 128)."""
    return group_size >= 16 and group_size & (group_size - 1) == 0


def _block_k(config_block_k: int, group_size: int) -> int:
    if not kernel_supports_group(group_size):
        raise ValueError(f"the Triton weight-only kernel needs a power-of-two group size "
                         f">= 16, not {group_size}")
    # >= 32 so each half (even / odd weights) is a legal tl.dot depth
    return max(32, config_block_k)


def invoke_fused_moe_weight_only_gemm(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                                      c: torch.Tensor, *, weight_format: str, group_size: int,
                                      sorted_pair_ids: torch.Tensor, expert_ids: torch.Tensor,
                                      num_pairs_post_padded: torch.Tensor, top_k: int,
                                      gather_rows: bool,
                                      channel_scale: torch.Tensor | None = None,
                                      bias: torch.Tensor | None = None,
                                      topk_weights: torch.Tensor | None = None) -> None:
    """``c[p] = (a[row(p)] @ deq(b[e]).T * channel_scale[e] + bias[e]) * topk_weights[p]``
    for every aligned pair p of expert e (see ``invoke_fused_moe_gemm``)."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weight_format!r}")
    _check(a, b, scale, c, group_size)
    num_valid_pairs = c.shape[0]
    _, N, _ = b.shape
    K = a.shape[1]
    block_m = _alignment_block_size(sorted_pair_ids, expert_ids)
    config = default_config(block_m, N, K, a.dtype)
    bias_strides = (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)
    cs_strides = (channel_scale.stride(0), channel_scale.stride(1)) \
        if channel_scale is not None else (0, 0)
    weights = topk_weights.reshape(-1) if topk_weights is not None else None
    block_k = _block_k(config["BLOCK_SIZE_K"], group_size)
    grid = (triton.cdiv(sorted_pair_ids.numel(), block_m) * triton.cdiv(N, config["BLOCK_SIZE_N"]),)
    _fused_moe_weight_only_kernel[grid](
        a, b, scale, channel_scale, c, bias, weights, sorted_pair_ids, expert_ids,
        num_pairs_post_padded, N, K, num_valid_pairs, sorted_pair_ids.numel(), group_size,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        scale.stride(0), scale.stride(1), scale.stride(2), *cs_strides,
        c.stride(0), c.stride(1), *bias_strides,
        TOP_K=top_k, WEIGHT_FORMAT=WEIGHT_FORMATS[weight_format], GATHER_ROWS=gather_rows,
        HAS_BIAS=bias is not None, HAS_CHANNEL_SCALE=channel_scale is not None,
        MUL_ROUTED_WEIGHT=topk_weights is not None,
        INPUT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_SIZE_M=block_m, BLOCK_SIZE_N=config["BLOCK_SIZE_N"],
        BLOCK_SIZE_K=block_k, GROUP_SIZE_M=config["GROUP_SIZE_M"],
        SCALE_ROWS=max(block_k // group_size, 1),
        num_warps=config["num_warps"], num_stages=config["num_stages"])


def fused_moe_weight_only_gemm_torch(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                                     c: torch.Tensor, *, weight_format: str, group_size: int,
                                     sorted_pair_ids: torch.Tensor, expert_ids: torch.Tensor,
                                     num_pairs_post_padded: torch.Tensor, top_k: int,
                                     gather_rows: bool,
                                     channel_scale: torch.Tensor | None = None,
                                     bias: torch.Tensor | None = None,
                                     topk_weights: torch.Tensor | None = None) -> None:
    """Reference of ``invoke_fused_moe_weight_only_gemm`` (dequantize, float32)."""
    _check(a, b, scale, c, group_size)
    for e, p in aligned_pairs_by_expert(sorted_pair_ids, expert_ids, num_pairs_post_padded,
                                        c.shape[0]):
        rows = p // top_k if gather_rows else p
        if weight_format == "int4":
            w = dequant_int4(b[e], scale[e], group_size)
        else:
            w = dequant_fp4(b[e], scale[e], group_size,
                            "e4m3" if weight_format == "nvfp4" else "e8m0")
        out = a[rows].float() @ w.T
        if channel_scale is not None:
            out *= channel_scale[e].float()
        store_pair_rows(c, p, out, e, bias, topk_weights)
