"""Triton LoRA shrink and expand on the experts of a fused MoE layer, with
the semantics of ``torch_ops.fused_moe_lora_shrink`` / ``_expand``.

Design
------
``moe_lora_align_block_size`` sorts, separately for every adapter slot, the
(token, expert) pairs of the slot's tokens by expert and pads each expert's
run to BLOCK_SIZE_M, so every block of ``sorted_pair_ids[slot]`` belongs to
one (slot, expert) and one program multiplies it by that pair of factors.
Rows are indexed by pair id (``t * top_k + j``) in ``out``, ``inter`` and
``y``, so results land where they belong without a scatter pass.

Grids are static (they depend on T*k, E and the block size only) so CUDA
graphs can capture the launches. Axis 0 covers the blocks one slot can use
at most, ``M = cdiv(T*k + min(E, T*k) * (BLOCK_SIZE_M - 1), BLOCK_SIZE_M)``
(no more than the buffer's ``P / BLOCK_SIZE_M``; at decode, where T*k < E,
far fewer):

- shrink: ``(M, max_loras, S * SPLIT_K)``; program
  ``(m, slot, s * SPLIT_K + j)`` computes ``x[rows] @ A_s[slot, e].T`` over
  the K blocks ``j, j + SPLIT_K, ...`` into ``out[s, pairs, :R]``;
- expand: ``(M, max_loras, S * cdiv(max N_s, BLOCK_N))``;
  program ``(m, slot, s * NB + n)`` adds ``inter[s, pairs] @ B_s[slot, e].T``
  (times the pair's routing weight when given) to one column block of slice
  s in ``y[pairs]``. One writer per element: no atomics.

A program returns at once when its slot's adapter does not touch the layer
(``adapter_enabled[slot] == 0``), when its block lies past the slot's
``num_pairs_post_padded`` (which also covers slots without pairs) or has
expert -1, or (expand) when its column block lies past N_s. Padding entries
hold the sentinel pair id ``T * top_k`` and are masked.

With few pairs (``VLLM_MOE_LORA_SHRINK_BY_PAIR_MAX_PAIRS``, the GEMM-epilogue
path only) the shrinks skip the alignment: ``fused_moe_lora_shrink_by_pair``
runs one program per pair and part of K, a GEMV, so no alignment launch and
its chain of dependent loads precede them; the w2 shrink is computed by the
gated activation as it writes each row (``MoELoRAPairShrink``).

Slices (gate/up) share one launch through the per-slice table of
``lora_ops`` (factor pointer, slot and expert strides, N_s, column offset),
and ``SPLIT_K > 1`` works as there: each split program stores its partial
sum in its own part of a ``[SPLIT_K, S, T*k, R]`` output, and expand adds
the parts up as it loads them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from vllm.lora.ops.triton_ops.lora_ops import (expand_add, input_precision, rank_block,
                                               shrink_block_k, shrink_parts, shrink_tile,
                                               slice_meta, slice_table, split_config)
from vllm.lora.ops.triton_ops.moe_lora_in_gemm import fused_width
from vllm.triton_utils import supports_pdl


@triton.jit
def _block_expert(enabled_ptr, num_pairs_post_padded_ptr, expert_ids_ptr, slot, pid_m,
                  stride_expert_ids, BLOCK_SIZE_M: tl.constexpr):
    """Expert of block pid_m of the slot's alignment; -1 when the program has
    nothing to do."""
    enabled = tl.load(enabled_ptr + slot) != 0
    in_use = pid_m * BLOCK_SIZE_M < tl.load(num_pairs_post_padded_ptr + slot)
    expert = tl.load(expert_ids_ptr + slot.to(tl.int64) * stride_expert_ids + pid_m)
    return tl.where(enabled & in_use, expert, -1).to(tl.int64)


@triton.jit
def _block_pairs(sorted_pair_ids_ptr, slot, pid_m, stride_sorted, num_valid_pairs,
                 BLOCK_SIZE_M: tl.constexpr):
    offs = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    pairs = tl.load(sorted_pair_ids_ptr + slot.to(tl.int64) * stride_sorted + offs).to(tl.int64)
    return pairs, pairs < num_valid_pairs


@triton.jit
def _moe_lora_shrink_kernel(
        x_ptr, w0_ptr, meta_ptr, out_ptr, sorted_pair_ids_ptr, expert_ids_ptr,
        num_pairs_post_padded_ptr, enabled_ptr,
        K, R, num_valid_pairs, stride_sorted, stride_expert_ids,
        stride_xt, stride_xk, stride_wr, stride_wk, stride_o_part, stride_os, stride_op,
        stride_or, stride_o_slot, TOP_K: tl.constexpr, GATHER_ROWS: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, BLOCK_SIZE_M: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, FACTOR_ALIGN: tl.constexpr):
    pid_m = tl.program_id(0)
    slot = tl.program_id(1)
    s = tl.program_id(2) // SPLIT_K
    split = tl.program_id(2) % SPLIT_K
    expert = _block_expert(enabled_ptr, num_pairs_post_padded_ptr, expert_ids_ptr, slot, pid_m,
                           stride_expert_ids, BLOCK_SIZE_M)
    if expert == -1:
        return
    pairs, valid = _block_pairs(sorted_pair_ids_ptr, slot, pid_m, stride_sorted,
                                num_valid_pairs, BLOCK_SIZE_M)
    offs_r = tl.arange(0, BLOCK_R)
    out_ptrs = (out_ptr + split.to(tl.int64) * stride_o_part + s.to(tl.int64) * stride_os
                + slot * stride_o_slot + pairs[:, None] * stride_op + offs_r[None, :] * stride_or)
    if GATHER_ROWS:
        rows = pairs // TOP_K
    else:
        rows = pairs
    w_ptr, stride_wl, stride_we, _, _ = slice_meta(meta_ptr, s, w0_ptr, FACTOR_ALIGN)
    acc = shrink_tile(x_ptr, w_ptr + slot * stride_wl + expert * stride_we, rows, valid, K, R,
                      split, stride_xt, stride_xk, stride_wr, stride_wk, INPUT_PRECISION,
                      BLOCK_SIZE_M, BLOCK_R, BLOCK_K, SPLIT_K)
    tl.store(out_ptrs, acc, mask=valid[:, None] & (offs_r < R)[None, :])


@triton.jit
def _moe_lora_expand_kernel(
        inter_ptr, w0_ptr, meta_ptr, y_ptr, topk_weights_ptr, sorted_pair_ids_ptr,
        expert_ids_ptr, num_pairs_post_padded_ptr, enabled_ptr,
        R, num_valid_pairs, num_n_blocks, stride_sorted, stride_expert_ids,
        stride_i_part, stride_is, stride_ip, stride_ir, stride_wn, stride_wr, stride_yp,
        stride_yn, MUL_ROUTED_WEIGHT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_SIZE_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLIT_K: tl.constexpr, FACTOR_ALIGN: tl.constexpr):
    pid_m = tl.program_id(0)
    slot = tl.program_id(1)
    s = tl.program_id(2) // num_n_blocks
    n0 = (tl.program_id(2) % num_n_blocks) * BLOCK_N
    w_ptr, stride_wl, stride_we, N, col_off = slice_meta(meta_ptr, s, w0_ptr, FACTOR_ALIGN)
    if n0 >= N:
        return
    expert = _block_expert(enabled_ptr, num_pairs_post_padded_ptr, expert_ids_ptr, slot, pid_m,
                           stride_expert_ids, BLOCK_SIZE_M)
    if expert == -1:
        return
    pairs, valid = _block_pairs(sorted_pair_ids_ptr, slot, pid_m, stride_sorted,
                                num_valid_pairs, BLOCK_SIZE_M)
    if MUL_ROUTED_WEIGHT:
        scale = tl.load(topk_weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
    else:
        scale = 0.0
    expand_add(inter_ptr + s.to(tl.int64) * stride_is,
               w_ptr + slot * stride_wl + expert * stride_we, y_ptr, pairs, valid, scale,
               col_off, n0, N, R, stride_i_part, stride_ip, stride_ir, stride_wn, stride_wr,
               stride_yp, stride_yn, INPUT_PRECISION, MUL_ROUTED_WEIGHT, BLOCK_R, BLOCK_N,
               SPLIT_K)


def moe_lora_block_size(num_pairs: int, num_experts: int, max_loras: int) -> int:
    """BLOCK_SIZE_M to align the LoRA pairs with. Each (slot, expert) group
    is padded to a whole block, and with several adapters the pairs split
    over up to ``max_loras`` slots, so blocks stay smaller than for the base
    expert GEMMs; LoRA tiles are thin (rank wide), so large blocks gain
    little."""
    per_group = num_pairs / max(num_experts * max_loras, 1)
    if per_group <= 16:
        return 16
    if per_group <= 48:
        return 32
    return 64


def _check_alignment(sorted_pair_ids: torch.Tensor, expert_ids: torch.Tensor,
                     num_pairs_post_padded: torch.Tensor, adapter_enabled: torch.Tensor,
                     block_size_m: int | None) -> tuple[int, int]:
    """-> (max_loras, block size)."""
    L, P = sorted_pair_ids.shape
    if expert_ids.shape[0] != L or expert_ids.shape[1] == 0 or P % expert_ids.shape[1]:
        raise ValueError(f"sorted_pair_ids {tuple(sorted_pair_ids.shape)} and expert_ids "
                         f"{tuple(expert_ids.shape)} are no block alignment")
    block = P // expert_ids.shape[1]
    if block_size_m is not None and block_size_m != block:
        raise ValueError(f"block_size_m {block_size_m} differs from the alignment's {block}")
    if block < 16:
        raise ValueError(f"block size {block} < 16 (tl.dot needs 16)")
    if num_pairs_post_padded.numel() != L or adapter_enabled.numel() < L:
        raise ValueError(f"num_pairs_post_padded and adapter_enabled need {L} entries")
    if sorted_pair_ids.stride(1) != 1 or expert_ids.stride(1) != 1:
        raise ValueError("sorted_pair_ids and expert_ids must be contiguous per slot")
    return L, block


@triton.jit
def pair_slot_expert(p, topk_ids_ptr, slot_ptr, enabled_ptr, top_k):
    """-> (slot, expert) of pair p (clamped to >= 0), whether it has both (an
    adapter and an expert on this rank) and whether, in addition, its
    adapter touches the layer. Factor loads need only the first three: the
    adapter flag is one more dependent load, for the store to wait on."""
    expert = tl.load(topk_ids_ptr + p).to(tl.int64)
    slot = tl.load(slot_ptr + p // top_k).to(tl.int64)
    routed = (expert >= 0) & (slot >= 0)
    on = routed & (tl.load(enabled_ptr + tl.maximum(slot, 0)) != 0)
    return tl.maximum(slot, 0), tl.maximum(expert, 0), routed, on


@triton.jit
def pair_factor_chunk(w_ptr, offs_k, k_mask, R, stride_wr, stride_wk, BLOCK_R: tl.constexpr):
    """Columns ``offs_k`` of one pair's factor W [R, K]: [BLOCK_R, BLOCK_K].
    Its product with the pair's input row is a GEMV: the one row gives
    nothing for tl.dot to tile."""
    offs_r = tl.arange(0, BLOCK_R)
    return tl.load(w_ptr + offs_r[:, None] * stride_wr + offs_k[None, :] * stride_wk,
                   mask=(offs_r < R)[:, None] & k_mask[None, :], other=0.0)


@triton.jit
def _moe_lora_shrink_by_pair_kernel(
        x_ptr, w0_ptr, meta_ptr, out_ptr, topk_ids_ptr, slot_ptr, enabled_ptr,
        K, R, stride_xt, stride_xk, stride_wr, stride_wk, stride_o_part, stride_os,
        stride_op, stride_or, TOP_K: tl.constexpr, GATHER_ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, FACTOR_ALIGN: tl.constexpr,
        LAUNCH_DEPENDENTS: tl.constexpr):
    if LAUNCH_DEPENDENTS:
        # the GEMM that reads the output may start now (it waits before reading)
        gdc_launch_dependents()
    p = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1) // SPLIT_K
    split = tl.program_id(1) % SPLIT_K
    slot, expert, routed, on = pair_slot_expert(p, topk_ids_ptr, slot_ptr, enabled_ptr, TOP_K)
    if not routed:
        return
    w_ptr, stride_wl, stride_we, _, _ = slice_meta(meta_ptr, s, w0_ptr, FACTOR_ALIGN)
    w_ptr += slot * stride_wl + expert * stride_we
    if GATHER_ROWS:
        row = p // TOP_K
    else:
        row = p
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for kb in range(split, tl.cdiv(K, BLOCK_K), SPLIT_K):
        k = kb * BLOCK_K + offs_k
        x = tl.load(x_ptr + row * stride_xt + k * stride_xk, mask=k < K, other=0.0)
        w = pair_factor_chunk(w_ptr, k, k < K, R, stride_wr, stride_wk, BLOCK_R)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    offs_r = tl.arange(0, BLOCK_R)
    out = (out_ptr + split.to(tl.int64) * stride_o_part + s.to(tl.int64) * stride_os
           + p * stride_op + offs_r * stride_or)
    tl.store(out, acc, mask=(offs_r < R) & on)


def fused_moe_lora_shrink_by_pair(x: torch.Tensor, lora_a: list[torch.Tensor],
                                  topk_ids: torch.Tensor, token_lora_slot: torch.Tensor,
                                  adapter_enabled: torch.Tensor, gather_rows: bool,
                                  out: torch.Tensor, config: dict[str, Any] | None = None
                                  ) -> None:
    """``fused_moe_lora_shrink`` without an alignment, one program per
    (token, expert) pair (a GEMV over K): for few pairs, where the slot
    alignment launch and its dependent loads cost more than the shrink.
    Pairs whose expert is -1, whose token has no adapter or whose adapter
    skips the layer are not written."""
    T, k = topk_ids.shape
    S, w0 = len(lora_a), lora_a[0]
    table, (stride_wr, stride_wk), align = slice_table(lora_a)
    R, K = w0.shape[2:]
    if x.shape[1] != K or x.dtype != w0.dtype or \
            x.shape[0] * (k if gather_rows else 1) != T * k or token_lora_slot.numel() != T:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype}, {token_lora_slot.numel()} token slots "
                         f"do not fit lora_a {tuple(w0.shape)} {w0.dtype} and {T}x{k} pairs")
    parts = shrink_parts(out, (S, T * k, R))
    config = split_config(config, lambda: moe_lora_shrink_by_pair_config(K), parts)
    split_k = config["SPLIT_K"]
    _moe_lora_shrink_by_pair_kernel[(T * k, S * split_k)](
        x, w0, table, parts, topk_ids.contiguous(), token_lora_slot,
        adapter_enabled, K, R, x.stride(0), x.stride(1), stride_wr, stride_wk,
        *parts.stride(), TOP_K=k, GATHER_ROWS=gather_rows, BLOCK_R=rank_block(R),
        BLOCK_K=config["BLOCK_SIZE_K"], SPLIT_K=split_k, FACTOR_ALIGN=align,
        LAUNCH_DEPENDENTS=supports_pdl(x.device), num_warps=config["num_warps"])


def moe_lora_shrink_by_pair_config(K: int) -> dict[str, int]:
    """Each program reads one ``[R, BLOCK_K]`` factor chunk, so all of a
    pair's K is in flight at once (the loop only runs past 8 parts x 512):
    at one token a loop of dependent DRAM reads is the kernel's whole time."""
    split_k = min(MAX_SHRINK_PARTS, triton.cdiv(K, 512))
    block_k = min(512, triton.next_power_of_2(triton.cdiv(K, split_k)))
    return {"BLOCK_SIZE_K": max(16, block_k), "SPLIT_K": split_k, "num_warps": 4}


@dataclass
class MoELoRAPairShrink:
    """The shrink by pair of one projection, for the kernel that produces its
    input rows to compute on the fly (``gated_activation_triton``): each of
    that kernel's column blocks of ``pair_shrink_block(R)`` columns writes
    its partial sum to its own part of ``out``."""
    lora_a: torch.Tensor            # [L, E, R, K]
    topk_ids: torch.Tensor          # [T, k] local expert ids, -1 = another rank's
    token_lora_slot: torch.Tensor   # [T] int32, -1 = no adapter
    adapter_enabled: torch.Tensor   # [L]
    out: torch.Tensor               # [pair_shrink_parts(K, R), 1, T*k, R] float32


# Most parts of a shrink output: the GEMM epilogue adds them up unrolled.
MAX_SHRINK_PARTS = 8


def pair_shrink_block(R: int) -> int:
    """Columns per program of a shrink done by the producer of its input:
    ``[R, block]`` fp32 products stay within ~64 registers a thread at 4 warps."""
    return min(512, 8192 // rank_block(R))


def pair_shrink_parts(K: int, R: int) -> int | None:
    """Parts of such a shrink's output over K input columns; None when there
    would be more than ``MAX_SHRINK_PARTS`` (run ``fused_moe_lora_shrink_by_pair``
    after the producer instead)."""
    parts = triton.cdiv(K, pair_shrink_block(R))
    return parts if parts <= MAX_SHRINK_PARTS else None


def pair_shrink_kernel_args(lora: MoELoRAPairShrink, rows: int, K: int) -> dict[str, Any]:
    """The LoRA arguments of a producer kernel of ``rows`` rows of K columns,
    after checking that the payload fits them."""
    L, E, R, K_a = lora.lora_a.shape
    T, k = lora.topk_ids.shape
    parts = pair_shrink_parts(K, R)
    if K_a != K or rows != T * k or lora.token_lora_slot.numel() != T:
        raise ValueError(f"lora_a {tuple(lora.lora_a.shape)} and {T}x{k} pairs do not fit "
                         f"{rows} rows of {K} columns")
    if parts is None or tuple(lora.out.shape) != (parts, 1, rows, R) or \
            lora.out.dtype != torch.float32 or lora.out.stride(3) != 1:
        raise ValueError(f"the shrink output must be float32 [{parts}, 1, {rows}, {R}] with "
                         f"contiguous rows, got {lora.out.dtype} {list(lora.out.shape)}")
    if not lora.topk_ids.is_contiguous() or lora.adapter_enabled.numel() < L:
        raise ValueError("topk_ids must be contiguous, adapter_enabled cover every slot")
    return dict(lora_w_ptr=lora.lora_a, lora_out_ptr=lora.out, lora_topk_ids_ptr=lora.topk_ids,
                lora_slot_ptr=lora.token_lora_slot, lora_enabled_ptr=lora.adapter_enabled,
                lora_rank=R, LORA_TOP_K=k, stride_lwl=lora.lora_a.stride(0),
                stride_lwe=lora.lora_a.stride(1), stride_lwr=lora.lora_a.stride(2),
                stride_lwk=lora.lora_a.stride(3), stride_lo_part=lora.out.stride(0),
                stride_lo_p=lora.out.stride(2), LORA=True, LORA_BLOCK_R=rank_block(R))


def _grid_blocks(num_blocks: int, num_valid_pairs: int, num_experts: int, block: int) -> int:
    """Blocks a slot can use at most: its pairs fall to at most min(E, pairs)
    experts, each padded by less than a block. The buffer's size assumes
    every expert has pairs; at decode most of those programs would only
    exit."""
    bound = triton.cdiv(num_valid_pairs + min(num_experts, num_valid_pairs) * (block - 1), block)
    return max(1, min(num_blocks, bound))


def moe_lora_shrink_config(num_pairs: int, K: int, R: int, block_size_m: int,
                           dtype: torch.dtype) -> dict[str, int]:
    """Untuned launch parameters. With few pairs there are few (slot, expert)
    blocks, each walking all of K: split K then."""
    block_k = shrink_block_k(K, R, block_size_m, dtype)
    split_k = min(4, max(1, triton.cdiv(K, block_k) // 2)) if num_pairs <= 256 else 1
    return {"BLOCK_SIZE_K": block_k, "SPLIT_K": split_k, "num_warps": 4, "num_stages": 3}


def moe_lora_expand_config(N: int, block_size_m: int) -> dict[str, int]:
    """Untuned launch parameters."""
    block_n = 64 if block_size_m <= 32 else 128
    return {"BLOCK_SIZE_N": max(16, min(block_n, triton.next_power_of_2(N))), "num_warps": 4}


def fused_moe_lora_shrink(x: torch.Tensor, lora_a: list[torch.Tensor],
                          sorted_pair_ids: torch.Tensor, expert_ids: torch.Tensor,
                          num_pairs_post_padded: torch.Tensor, adapter_enabled: torch.Tensor,
                          top_k: int, gather_rows: bool, out: torch.Tensor, block_size_m: int,
                          config: dict[str, Any] | None = None, spread: bool = False) -> None:
    """``out[s, p] = x[row(p)] @ lora_a[s][slot, e].T`` for every aligned pair
    p of slot ``slot`` and expert e whose adapter is enabled, with
    ``row(p) = p // top_k`` when ``gather_rows`` (x ``[T, K]``) else p
    (x ``[T*k, K]``); ``lora_a[s]`` is ``[L, E, R, K]`` and out
    ``[S, T*k, R]`` float32, or ``[SPLIT_K, S, T*k, R]``: partial sums over K
    that add up to it. Other rows of out are not touched.

    ``spread``: out is ``[S, T*k, fused_width(L, R)]`` in x's dtype and the
    pair's R values go to its slot's columns, ``slot * rank_block(R)`` on
    (the input of the expert GEMM's LoRA K steps, ``MoELoRAGemmFusion.
    inter_spread``); the caller zeroes out first. No split K."""
    L, block = _check_alignment(sorted_pair_ids, expert_ids, num_pairs_post_padded,
                                adapter_enabled, block_size_m)
    S = len(lora_a)
    table, (stride_wr, stride_wk), align = slice_table(lora_a)
    w0 = lora_a[0]
    if w0.dim() != 4 or w0.shape[0] < L or x.shape[1] != w0.shape[3]:
        raise ValueError(f"lora_a {tuple(w0.shape)} does not fit x {tuple(x.shape)} and "
                         f"{L} slots")
    R, K = w0.shape[2:]
    num_valid_pairs = out.shape[-2]
    if x.shape[0] * (top_k if gather_rows else 1) != num_valid_pairs:
        raise ValueError(f"x has {x.shape[0]} rows for {num_valid_pairs} pairs, top_k {top_k}")
    if x.dtype != w0.dtype:
        raise ValueError(f"x is {x.dtype} but the factors are {w0.dtype}")
    if spread:
        width = fused_width(w0.shape[0], R)
        if out.shape != (S, num_valid_pairs, width) or out.dtype != x.dtype:
            raise ValueError(f"the spread shrink output must be {x.dtype} [{S}, "
                             f"{num_valid_pairs}, {width}], got {out.dtype} {list(out.shape)}")
        parts, stride_slot = out.unsqueeze(0), rank_block(R) * out.stride(2)
        if config is not None and config["SPLIT_K"] != 1:
            raise ValueError("a spread shrink output takes no split K")
    else:
        parts, stride_slot = shrink_parts(out, (S, num_valid_pairs, R)), 0
    config = split_config(
        config, lambda: moe_lora_shrink_config(num_valid_pairs, K, R, block, w0.dtype), parts)
    split_k = config["SPLIT_K"]
    m_blocks = _grid_blocks(expert_ids.shape[1], num_valid_pairs, w0.shape[1], block)
    _moe_lora_shrink_kernel[(m_blocks, L, S * split_k)](
        x, w0, table, parts, sorted_pair_ids, expert_ids, num_pairs_post_padded,
        adapter_enabled, K, R, num_valid_pairs, sorted_pair_ids.stride(0),
        expert_ids.stride(0), x.stride(0), x.stride(1), stride_wr, stride_wk, *parts.stride(),
        stride_slot, TOP_K=top_k, GATHER_ROWS=gather_rows,
        INPUT_PRECISION=input_precision(w0.dtype), BLOCK_SIZE_M=block, BLOCK_R=rank_block(R),
        BLOCK_K=config["BLOCK_SIZE_K"], SPLIT_K=split_k, FACTOR_ALIGN=align,
        num_warps=config["num_warps"], num_stages=config["num_stages"])


def fused_moe_lora_expand(inter: torch.Tensor, lora_b: list[torch.Tensor],
                          sorted_pair_ids: torch.Tensor, expert_ids: torch.Tensor,
                          num_pairs_post_padded: torch.Tensor, adapter_enabled: torch.Tensor,
                          y: torch.Tensor, slice_offsets: list[int],
                          topk_weights: torch.Tensor | None = None,
                          block_size_m: int | None = None,
                          config: dict[str, Any] | None = None) -> None:
    """``y[p, off_s : off_s + N_s] += inter[s, p] @ lora_b[s][slot, e].T``
    (times ``topk_weights.flatten()[p]`` when given) for every aligned pair
    p of slot ``slot`` and expert e whose adapter is enabled; inter is
    ``[S, T*k, R]`` or its ``[SPLIT_K, S, T*k, R]`` parts, ``lora_b[s]``
    ``[L, E, N_s, R]``, y ``[T*k, N]``. The sum is formed in fp32 and rounded
    once to y's dtype; other rows and columns of y are not touched.
    ``block_size_m`` defaults to the alignment's."""
    L, block = _check_alignment(sorted_pair_ids, expert_ids, num_pairs_post_padded,
                                adapter_enabled, block_size_m)
    S, num_valid_pairs, R = inter.shape[-3:]
    parts = shrink_parts(inter, (S, num_valid_pairs, R))
    if len(lora_b) != S:
        raise ValueError(f"inter has {S} slices but there are {len(lora_b)} factors")
    table, (stride_wn, stride_wr), align = slice_table(lora_b, 2, slice_offsets)
    w0 = lora_b[0]
    if w0.dim() != 4 or w0.shape[0] < L or w0.shape[3] != R or y.shape[0] != num_valid_pairs:
        raise ValueError(f"lora_b {tuple(w0.shape)}, inter {tuple(inter.shape)} and "
                         f"y {tuple(y.shape)} do not fit {L} slots")
    for b, off in zip(lora_b, slice_offsets):
        if off < 0 or off + b.shape[2] > y.shape[1]:
            raise ValueError(f"slice [{off}, {off + b.shape[2]}) outside y's {y.shape[1]} columns")
    weights = None
    if topk_weights is not None:
        weights = topk_weights.reshape(-1)
        if weights.numel() != num_valid_pairs:
            raise ValueError(f"{weights.numel()} routing weights for {num_valid_pairs} pairs")
    max_n = max(b.shape[2] for b in lora_b)
    config = config or moe_lora_expand_config(max_n, block)
    block_n = config["BLOCK_SIZE_N"]
    num_n_blocks = triton.cdiv(max_n, block_n)
    m_blocks = _grid_blocks(expert_ids.shape[1], num_valid_pairs, w0.shape[1], block)
    _moe_lora_expand_kernel[(m_blocks, L, S * num_n_blocks)](
        parts, w0, table, y, weights, sorted_pair_ids, expert_ids, num_pairs_post_padded,
        adapter_enabled, R, num_valid_pairs, num_n_blocks, sorted_pair_ids.stride(0),
        expert_ids.stride(0), *parts.stride(), stride_wn, stride_wr, y.stride(0), y.stride(1),
        MUL_ROUTED_WEIGHT=weights is not None, INPUT_PRECISION=input_precision(w0.dtype),
        BLOCK_SIZE_M=block, BLOCK_R=rank_block(R), BLOCK_N=block_n, SPLIT_K=parts.shape[0],
        FACTOR_ALIGN=align, num_warps=config["num_warps"])
