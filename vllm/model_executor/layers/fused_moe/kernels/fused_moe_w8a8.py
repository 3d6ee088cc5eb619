"""Grouped FP8 W8A8 expert GEMM over block-sorted (token, expert) pairs.

Same pair conventions as ``fused_moe_gemm`` (rows indexed by pair id, one
expert per ``BLOCK_SIZE_M`` block). A is FP8 with a scale per tensor
(``[1]``), per row (``[M, 1]``) or per row and K group (``[M, K / gk]``);
B is FP8 ``[E, N, K]`` with a scale per output row (``[E, N]``) or per
output row and K block (``[E, N, K / gk]``, block scales expanded along N).
Per-channel products are scaled once after the K loop; block products per
K step, so ``BLOCK_SIZE_K`` divides the group size.

The kernel only multiplies and scales: under ``TRITON_INTERPRET=1`` (no FP8
in numpy) it runs on float32 copies holding the same FP8 values.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm.model_executor.layers.fused_moe.kernels.moe_tile import moe_tile, moe_tile_store

from vllm.model_executor.layers.fused_moe.kernels.fused_moe_gemm import (
    _alignment_block_size, aligned_pairs_by_expert, default_config, store_pair_rows)


@triton.jit
def _fused_moe_w8a8_kernel(
        a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, bias_ptr, topk_weights_ptr,
        sorted_pair_ids_ptr, expert_ids_ptr, num_pairs_post_padded_ptr,
        N, K, num_valid_pairs, num_padded_pairs, group_k,
        stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
        stride_bias_e, stride_bias_n, stride_asm, stride_ask, stride_bse, stride_bsn,
        stride_bsk,
        TOP_K: tl.constexpr, GATHER_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
        MUL_ROUTED_WEIGHT: tl.constexpr, PER_ROW_A_SCALE: tl.constexpr, BLOCK_SCALES: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
        BLOCK_SIZE_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr):
    active, expert, pair, pair_mask, row, offs_n, n_mask = moe_tile(
        tl.program_id(0), num_padded_pairs, num_pairs_post_padded_ptr, expert_ids_ptr,
        sorted_pair_ids_ptr, num_valid_pairs, TOP_K, N, GATHER_ROWS, BLOCK_SIZE_M, BLOCK_SIZE_N,
        GROUP_SIZE_M)
    if not active:
        return
    offs_k = tl.arange(0, BLOCK_SIZE_K)

    a_ptrs = a_ptr + row[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = (b_ptr + expert * stride_be + offs_k[:, None] * stride_bk
              + offs_n[None, :] * stride_bn)
    a_scale_rows = a_scale_ptr + row * stride_asm
    b_scale_cols = b_scale_ptr + expert * stride_bse + offs_n * stride_bsn
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        k_left = K - kb * BLOCK_SIZE_K
        a = tl.load(a_ptrs, mask=pair_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & n_mask[None, :], other=0.0)
        if BLOCK_SCALES:
            g = (kb * BLOCK_SIZE_K) // group_k
            a_s = tl.load(a_scale_rows + g * stride_ask, mask=pair_mask, other=0.0)
            b_s = tl.load(b_scale_cols + g * stride_bsk, mask=n_mask, other=0.0)
            acc += tl.dot(a, b, input_precision=INPUT_PRECISION) * a_s[:, None] * b_s[None, :]
        else:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_SIZE_K * stride_ak
        b_ptrs += BLOCK_SIZE_K * stride_bk

    if not BLOCK_SCALES:
        if PER_ROW_A_SCALE:
            a_s = tl.load(a_scale_rows, mask=pair_mask, other=0.0)
            acc *= a_s[:, None]
        else:
            acc *= tl.load(a_scale_ptr)
        acc *= tl.load(b_scale_cols, mask=n_mask, other=0.0)[None, :]
    moe_tile_store(acc, c_ptr, bias_ptr, topk_weights_ptr, expert, pair, pair_mask, offs_n, n_mask,
                   stride_cm, stride_cn, stride_bias_e, stride_bias_n, HAS_BIAS, MUL_ROUTED_WEIGHT)


def _check(a, a_scale, b, b_scale, c, group_k):
    _, N, K = b.shape
    if a.shape[1] != K or c.shape[1] != N:
        raise ValueError(f"shapes do not chain: a {tuple(a.shape)}, b {tuple(b.shape)}, "
                         f"c {tuple(c.shape)}")
    if group_k is not None:
        groups = -(-K // group_k)
        if b_scale.shape != (b.shape[0], N, groups) or a_scale.shape[-1] != groups:
            raise ValueError(f"block scales {tuple(a_scale.shape)} / {tuple(b_scale.shape)} do "
                             f"not fit K={K} in groups of {group_k}")
    elif b_scale.shape != (b.shape[0], N):
        raise ValueError(f"per-channel weight scale {tuple(b_scale.shape)} is not "
                         f"{(b.shape[0], N)}")


def invoke_fused_moe_w8a8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                               b_scale: torch.Tensor, c: torch.Tensor, *,
                               sorted_pair_ids: torch.Tensor, expert_ids: torch.Tensor,
                               num_pairs_post_padded: torch.Tensor, top_k: int,
                               gather_rows: bool, group_k: int | None = None,
                               bias: torch.Tensor | None = None,
                               topk_weights: torch.Tensor | None = None) -> None:
    """``c[p] = ((a[row(p)] * sa) @ (b[e] * sb).T + bias[e]) * topk_weights[p]``
    for every aligned pair p of expert e (see ``invoke_fused_moe_gemm``).
    ``group_k`` set: block scales over K groups of that size; else
    per-tensor/per-row A scales and per-channel B scales."""
    _check(a, a_scale, b, b_scale, c, group_k)
    num_valid_pairs = c.shape[0]
    _, N, K = b.shape
    block_m = _alignment_block_size(sorted_pair_ids, expert_ids)
    config = default_config(block_m, N, K, torch.bfloat16)
    if group_k is not None:
        if group_k < 16 or group_k & (group_k - 1):
            raise ValueError(f"block size {group_k} must be a power of two >= 16")
        config["BLOCK_SIZE_K"] = min(group_k, 128 if a.element_size() == 1 else 64)
    elif a.element_size() == 1:
        config["BLOCK_SIZE_K"] = max(16, min(128, triton.next_power_of_2(K)))
    a_scale2 = a_scale.reshape(a_scale.shape[0], -1) if a_scale.dim() > 1 else a_scale
    per_row = a_scale.numel() > 1
    bias_strides = (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)
    bs = b_scale.stride()
    weights = topk_weights.reshape(-1) if topk_weights is not None else None
    grid = (triton.cdiv(sorted_pair_ids.numel(), block_m) * triton.cdiv(N, config["BLOCK_SIZE_N"]),)
    _fused_moe_w8a8_kernel[grid](
        a, a_scale2, b, b_scale, c, bias, weights, sorted_pair_ids, expert_ids,
        num_pairs_post_padded, N, K, num_valid_pairs, sorted_pair_ids.numel(), group_k or K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        *bias_strides, a_scale2.stride(0) if per_row else 0,
        a_scale2.stride(1) if per_row and a_scale2.dim() > 1 else 0,
        bs[0], bs[1], bs[2] if len(bs) > 2 else 0,
        TOP_K=top_k, GATHER_ROWS=gather_rows, HAS_BIAS=bias is not None,
        MUL_ROUTED_WEIGHT=topk_weights is not None, PER_ROW_A_SCALE=per_row,
        BLOCK_SCALES=group_k is not None,
        INPUT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_SIZE_M=block_m, BLOCK_SIZE_N=config["BLOCK_SIZE_N"],
        BLOCK_SIZE_K=config["BLOCK_SIZE_K"], GROUP_SIZE_M=config["GROUP_SIZE_M"],
        num_warps=config["num_warps"], num_stages=config["num_stages"])


def fused_moe_w8a8_gemm_torch(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                              b_scale: torch.Tensor, c: torch.Tensor, *,
                              sorted_pair_ids: torch.Tensor, expert_ids: torch.Tensor,
                              num_pairs_post_padded: torch.Tensor, top_k: int,
                              gather_rows: bool, group_k: int | None = None,
                              bias: torch.Tensor | None = None,
                              topk_weights: torch.Tensor | None = None) -> None:
    """Reference of ``invoke_fused_moe_w8a8_gemm``: dequantize, multiply in float32."""
    _check(a, a_scale, b, b_scale, c, group_k)
    K = b.shape[2]
    if group_k is not None:
        a_deq = a.float() * a_scale.float().repeat_interleave(group_k, dim=1)[:, :K]
    else:
        a_deq = a.float() * a_scale.float().reshape(-1, 1)
    for e, p in aligned_pairs_by_expert(sorted_pair_ids, expert_ids, num_pairs_post_padded,
                                        c.shape[0]):
        rows = p // top_k if gather_rows else p
        if group_k is not None:
            w = b[e].float() * b_scale[e].float().repeat_interleave(group_k, dim=1)[:, :K]
        else:
            w = b[e].float() * b_scale[e].float().unsqueeze(1)
        store_pair_rows(c, p, a_deq[rows] @ w.T, e, bias, topk_weights)
