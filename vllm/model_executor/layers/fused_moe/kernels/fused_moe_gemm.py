"""Grouped expert GEMM over block-sorted (token, expert) pairs.

The pairs come from ``moe_align_block_size``: every block of ``BLOCK_SIZE_M``
consecutive entries of ``sorted_pair_ids`` belongs to one expert
(``expert_ids[block]``), so one program multiplies a BLOCK_M x K slice of
activations by one expert's K x BLOCK_N weight tile. Output rows are indexed
by pair id (``t * top_k + j``), so results land unsorted and no scatter pass
is needed afterwards.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from vllm.lora.ops.triton_ops.moe_lora_in_gemm import (NO_LORA_KERNEL_ARGS, MoELoRAGemmFusion,
                                                        fusion_block_n, lora_add_per_slot,
                                                        lora_early_default, lora_kernel_args,
                                                        lora_loop_operands, lora_loop_step,
                                                        lora_operands, lora_per_slot_default,
                                                        lora_per_slot_operands,
                                                        lora_shrink_factor_tile,
                                                        lora_shrink_rows,
                                                        lora_side_by_side_delta,
                                                        moe_lora_gemm_delta_torch)
from vllm.model_executor.layers.fused_moe.kernels.moe_tile import moe_tile, moe_tile_store


@triton.jit
def _fused_moe_gemm_kernel(
        a_ptr, b_ptr, c_ptr, bias_ptr, topk_weights_ptr,
        sorted_pair_ids_ptr, expert_ids_ptr, num_pairs_post_padded_ptr,
        N, K, num_valid_pairs, num_padded_pairs,
        stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
        stride_bias_e, stride_bias_n,
        lora_slot_ptr, lora_enabled_ptr, lora_a0_ptr, lora_a_meta_ptr, lora_b0_ptr,
        lora_b_meta_ptr, lora_inter_ptr, lora_num_slots, lora_rank, stride_lar, stride_lak,
        stride_lbn, stride_lbr, stride_li_part, stride_li_s, stride_li_p, stride_li_r,
        TOP_K: tl.constexpr, GATHER_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
        MUL_ROUTED_WEIGHT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
        GROUP_SIZE_M: tl.constexpr, LORA_MODE: tl.constexpr,
        LORA_EARLY: tl.constexpr, LORA_PER_SLOT: tl.constexpr, LORA_WAIT: tl.constexpr,
        LORA_NUM_SLICES: tl.constexpr, LORA_SPLIT_K: tl.constexpr, LORA_BLOCK_L: tl.constexpr,
        LORA_BLOCK_R: tl.constexpr, LORA_PRECISION: tl.constexpr,
        LORA_FACTOR_ALIGN: tl.constexpr, LORA_STEPS: tl.constexpr):
    active, expert, pair, pair_mask, row, offs_n, n_mask = moe_tile(
        tl.program_id(0), num_padded_pairs, num_pairs_post_padded_ptr, expert_ids_ptr,
        sorted_pair_ids_ptr, num_valid_pairs, TOP_K, N, GATHER_ROWS, BLOCK_SIZE_M, BLOCK_SIZE_N,
        GROUP_SIZE_M)
    if not active:
        if LORA_WAIT:
            gdc_wait()
        return
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    # LoRA: see vllm/lora/ops/triton_ops/moe_lora_in_gemm.py
    if LORA_PER_SLOT and LORA_EARLY:
        row_slot, lora_bits, lora_b_ptr, stride_lbl, lora_n, lora_n_ok, lora_s, lora_t = \
            lora_per_slot_operands(
                lora_slot_ptr, lora_enabled_ptr, lora_b0_ptr, lora_b_meta_ptr, lora_inter_ptr,
                lora_num_slots, lora_rank, expert, pair, pair_mask, TOP_K, offs_n, n_mask,
                stride_li_part, stride_li_s, stride_li_p, stride_li_r, LORA_NUM_SLICES,
                LORA_SPLIT_K, BLOCK_SIZE_M, LORA_BLOCK_L, LORA_BLOCK_R, not LORA_WAIT,
                LORA_FACTOR_ALIGN)
    elif (LORA_MODE == 1 or LORA_MODE == 2) and LORA_EARLY:
        (row_slot, lora_enabled, lora_mask, lora_a_ptr, stride_lal, lora_b, lora_acc,
         lora_s) = lora_operands(
            lora_slot_ptr, lora_enabled_ptr, lora_a0_ptr, lora_a_meta_ptr, lora_b0_ptr,
            lora_b_meta_ptr, lora_inter_ptr, lora_num_slots, lora_rank, expert, pair, pair_mask,
            TOP_K, offs_n, n_mask, stride_lbn, stride_lbr, stride_li_part, stride_li_s,
            stride_li_p, stride_li_r, LORA_MODE, LORA_NUM_SLICES, LORA_SPLIT_K, BLOCK_SIZE_M,
            LORA_BLOCK_L, LORA_BLOCK_R, not LORA_WAIT, LORA_FACTOR_ALIGN)
    elif LORA_MODE == 3:
        lora_rows, lora_f_ptr, stride_lbl, lora_f_cols, lora_n_ok = lora_loop_operands(
            lora_b0_ptr, lora_b_meta_ptr, lora_inter_ptr, expert, pair, offs_n, n_mask,
            stride_li_s, stride_li_p, stride_lbn, LORA_NUM_SLICES, LORA_FACTOR_ALIGN)

    a_ptrs = a_ptr + row[:, None] * stride_am + offs_k[None, :] * stride_ak
    # B[e] is [N, K]; reading it as a K x N tile computes a @ B[e].T.
    b_ptrs = (b_ptr + expert * stride_be + offs_k[:, None] * stride_bk
              + offs_n[None, :] * stride_bn)
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    num_k_blocks = tl.cdiv(K, BLOCK_SIZE_K)
    # LORA_STEPS (mode 3): the LoRA expand as K steps after the weights'
    for kb in range(0, num_k_blocks + LORA_STEPS):
        if LORA_MODE == 3:
            a_src, a_mask, b_src, b_mask = lora_loop_step(
                kb, num_k_blocks, K, a_ptr + row * stride_am, stride_ak, pair_mask,
                b_ptr + expert * stride_be, stride_bk, offs_n * stride_bn, n_mask, lora_rows,
                lora_f_ptr, stride_lbl, lora_f_cols, lora_n_ok, lora_num_slots, lora_rank,
                stride_lbr, BLOCK_SIZE_K, LORA_BLOCK_L, LORA_BLOCK_R)
        else:
            k_left = K - kb * BLOCK_SIZE_K
            a_src, a_mask = a_ptrs, pair_mask[:, None] & (offs_k[None, :] < k_left)
            b_src, b_mask = b_ptrs, (offs_k[:, None] < k_left) & n_mask[None, :]
        a = tl.load(a_src, mask=a_mask, other=0.0)
        b = tl.load(b_src, mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if LORA_MODE == 1:
            lora_a = lora_shrink_factor_tile(lora_a_ptr, stride_lal, lora_mask,
                                             kb * BLOCK_SIZE_K, K, stride_lar, stride_lak,
                                             BLOCK_SIZE_K, LORA_BLOCK_L, LORA_BLOCK_R)
            lora_acc = tl.dot(a, lora_a, lora_acc, input_precision=LORA_PRECISION)
        a_ptrs += BLOCK_SIZE_K * stride_ak
        b_ptrs += BLOCK_SIZE_K * stride_bk

    if LORA_WAIT:
        gdc_wait()
    if (LORA_MODE == 1 or LORA_MODE == 2) and not LORA_EARLY:
        if LORA_PER_SLOT:
            row_slot, lora_bits, lora_b_ptr, stride_lbl, lora_n, lora_n_ok, lora_s, lora_t = \
                lora_per_slot_operands(
                    lora_slot_ptr, lora_enabled_ptr, lora_b0_ptr, lora_b_meta_ptr,
                    lora_inter_ptr, lora_num_slots, lora_rank, expert, pair, pair_mask, TOP_K,
                    offs_n, n_mask, stride_li_part, stride_li_s, stride_li_p, stride_li_r,
                    LORA_NUM_SLICES, LORA_SPLIT_K, BLOCK_SIZE_M, LORA_BLOCK_L, LORA_BLOCK_R,
                    True, LORA_FACTOR_ALIGN)
        else:
            (row_slot, lora_enabled, lora_mask, lora_a_ptr, stride_lal, lora_b, lora_acc,
             lora_s) = lora_operands(
                lora_slot_ptr, lora_enabled_ptr, lora_a0_ptr, lora_a_meta_ptr, lora_b0_ptr,
                lora_b_meta_ptr, lora_inter_ptr, lora_num_slots, lora_rank, expert, pair,
                pair_mask, TOP_K, offs_n, n_mask, stride_lbn, stride_lbr, stride_li_part,
                stride_li_s, stride_li_p, stride_li_r, LORA_MODE, LORA_NUM_SLICES,
                LORA_SPLIT_K, BLOCK_SIZE_M, LORA_BLOCK_L, LORA_BLOCK_R, True,
                LORA_FACTOR_ALIGN)
    elif LORA_WAIT:  # early operands, the shrink rows only now that the shrink is done
        lora_rows = lora_shrink_rows(lora_inter_ptr, lora_s, pair, pair_mask, lora_rank,
                                     stride_li_part, stride_li_s, stride_li_p, stride_li_r,
                                     LORA_SPLIT_K, BLOCK_SIZE_M, LORA_BLOCK_R, True)
        if LORA_PER_SLOT:
            lora_t = lora_rows.to(lora_b0_ptr.dtype.element_ty)
        else:
            lora_acc = lora_rows
    if LORA_PER_SLOT:
        acc = lora_add_per_slot(acc, row_slot, lora_bits, lora_b_ptr, stride_lbl, lora_n,
                                lora_n_ok, lora_t, lora_rank, stride_lbn, stride_lbr,
                                LORA_BLOCK_L, LORA_BLOCK_R, LORA_PRECISION)
    elif LORA_MODE == 1 or LORA_MODE == 2:
        acc = lora_side_by_side_delta(acc, lora_acc, row_slot, lora_enabled, lora_b, LORA_MODE,
                                      BLOCK_SIZE_M, LORA_BLOCK_L, LORA_BLOCK_R, LORA_PRECISION)
    moe_tile_store(acc, c_ptr, bias_ptr, topk_weights_ptr, expert, pair, pair_mask, offs_n, n_mask,
                   stride_cm, stride_cn, stride_bias_e, stride_bias_n, HAS_BIAS, MUL_ROUTED_WEIGHT)


def moe_block_size(num_pairs: int, num_experts: int) -> int:
    """BLOCK_SIZE_M the default config uses for this many routed pairs: the
    block size to align the pairs with before running both expert GEMMs."""
    per_expert = num_pairs / max(num_experts, 1)
    if per_expert <= 16:
        return 16
    if per_expert <= 64:
        return 32
    if per_expert <= 512:
        return 64
    return 128


def default_config(block_m: int, N: int, K: int, dtype: torch.dtype) -> dict[str, int]:
    """Untuned launch parameters for an alignment of ``block_m`` rows (see
    ``moe_block_size``). Small blocks mean decode, bound by reading the
    weights: columns stay wide. Large blocks get square-ish tiles and more
    warps."""
    block_n = 64 if block_m <= 32 else 128
    # fp32 tiles are twice the bytes: keep the pipelined stages in shared memory.
    block_k = 64 if dtype.itemsize <= 2 else 32
    # tl.dot needs every tile dimension >= 16; no point in tiles wider than the matrix.
    block_n = max(16, min(block_n, triton.next_power_of_2(N)))
    block_k = max(16, min(block_k, triton.next_power_of_2(K)))
    return {"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": block_n, "BLOCK_SIZE_K": block_k,
            "GROUP_SIZE_M": 1 if block_m <= 16 else 8,
            "num_warps": 8 if block_m >= 128 else 4, "num_stages": 3}


def _alignment_block_size(sorted_pair_ids: torch.Tensor, expert_ids: torch.Tensor) -> int:
    block, rest = divmod(sorted_pair_ids.numel(), max(expert_ids.numel(), 1))
    if rest or block == 0:
        raise ValueError(f"{sorted_pair_ids.numel()} sorted pairs do not split into "
                         f"{expert_ids.numel()} blocks")
    return block


def invoke_fused_moe_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *,
                          sorted_pair_ids: torch.Tensor, expert_ids: torch.Tensor,
                          num_pairs_post_padded: torch.Tensor, top_k: int, gather_rows: bool,
                          bias: torch.Tensor | None = None,
                          topk_weights: torch.Tensor | None = None,
                          config: dict[str, Any] | None = None,
                          lora: MoELoRAGemmFusion | None = None) -> None:
    """``c[p] = (a[row(p)] @ b[e].T + bias[e]) * topk_weights.flatten()[p]``
    for every aligned pair p of expert e, with ``row(p) = p // top_k`` when
    ``gather_rows`` (a is [T, K]) else ``p`` (a is [T*k, K]). c is [T*k, N]:
    its row count is the sentinel pair id. Rows of c whose pair is in no
    block (or in a block of expert -1) are not written.

    ``lora`` adds the pair's adapter delta to ``a[row(p)] @ b[e].T`` before
    bias and weight (see ``moe_lora_in_gemm``); the column block may then
    shrink so that no block straddles a slice.

    The config's BLOCK_SIZE_M must equal the block size of the alignment;
    without a config one is picked for the problem size with that block size.
    """
    num_valid_pairs = c.shape[0]
    _, N, K = b.shape
    if a.shape[1] != K or c.shape[1] != N:
        raise ValueError(f"shapes do not chain: a {tuple(a.shape)}, b {tuple(b.shape)}, "
                         f"c {tuple(c.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"a is {a.dtype} but the expert weights are {b.dtype}")
    block_m = _alignment_block_size(sorted_pair_ids, expert_ids)
    if config is None:
        config = default_config(block_m, N, K, b.dtype)
    elif config["BLOCK_SIZE_M"] != block_m:
        raise ValueError(f"config BLOCK_SIZE_M {config['BLOCK_SIZE_M']} differs from the "
                         f"alignment block size {block_m}")
    weights = topk_weights.reshape(-1) if topk_weights is not None else None
    num_padded = sorted_pair_ids.numel()
    block_n = config["BLOCK_SIZE_N"]
    if lora is None:
        lora_args = NO_LORA_KERNEL_ARGS
    else:
        lora_args = lora_kernel_args(lora, a, num_valid_pairs, N, config["BLOCK_SIZE_K"],
                                     config.get("lora_early", lora_early_default(block_m)),
                                     config.get("lora_per_slot", lora_per_slot_default(block_m)))
        block_n = fusion_block_n(lora, block_n, N)
    grid = (triton.cdiv(num_padded, block_m) * triton.cdiv(N, block_n),)
    _fused_moe_gemm_kernel[grid](
        a, b, c, bias, weights, sorted_pair_ids, expert_ids, num_pairs_post_padded,
        N, K, num_valid_pairs, num_padded,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        **lora_args, TOP_K=top_k, GATHER_ROWS=gather_rows, HAS_BIAS=bias is not None,
        MUL_ROUTED_WEIGHT=topk_weights is not None,
        # fp32 must not silently drop to tf32; 16-bit inputs ignore this.
        INPUT_PRECISION="ieee" if b.dtype == torch.float32 else "tf32",
        BLOCK_SIZE_M=block_m, BLOCK_SIZE_N=block_n,
        BLOCK_SIZE_K=config["BLOCK_SIZE_K"], GROUP_SIZE_M=config["GROUP_SIZE_M"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
        launch_pdl=lora_args["LORA_WAIT"])


def fused_moe_gemm_torch(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *,
                         sorted_pair_ids: torch.Tensor, expert_ids: torch.Tensor,
                         num_pairs_post_padded: torch.Tensor, top_k: int, gather_rows: bool,
                         bias: torch.Tensor | None = None,
                         topk_weights: torch.Tensor | None = None,
                         config: dict[str, Any] | None = None,
                         lora: MoELoRAGemmFusion | None = None) -> None:
    """Reference of ``invoke_fused_moe_gemm`` (``config`` is ignored)."""
    for e, p in aligned_pairs_by_expert(sorted_pair_ids, expert_ids, num_pairs_post_padded,
                                        c.shape[0]):
        rows = p // top_k if gather_rows else p
        out = a[rows].float() @ b[e].float().T
        if lora is not None:
            out += moe_lora_gemm_delta_torch(lora, a, p, e, gather_rows, c.shape[1])
        store_pair_rows(c, p, out, e, bias, topk_weights)


def aligned_pairs_by_expert(sorted_pair_ids: torch.Tensor, expert_ids: torch.Tensor,
                            num_pairs_post_padded: torch.Tensor, num_valid_pairs: int
                            ) -> list[tuple[int, torch.Tensor]]:
    """The torch references' reading of an alignment: (expert, its pair ids)
    over the used blocks, skipping padding and experts of other ranks (-1)."""
    block_m = _alignment_block_size(sorted_pair_ids, expert_ids)
    used = int(num_pairs_post_padded.reshape(-1)[0])
    pairs = sorted_pair_ids[:used].long()
    experts = expert_ids[:used // block_m].long().repeat_interleave(block_m)
    keep = (pairs < num_valid_pairs) & (experts >= 0)
    pairs, experts = pairs[keep], experts[keep]
    return [(e, pairs[experts == e]) for e in experts.unique().tolist()]


def store_pair_rows(c: torch.Tensor, pairs: torch.Tensor, out: torch.Tensor, expert: int,
                    bias: torch.Tensor | None, topk_weights: torch.Tensor | None) -> None:
    """The references' ``moe_tile_store``: add the expert's bias, scale by
    the pairs' routing weights, store the float32 rows in c's dtype."""
    if bias is not None:
        out = out + bias[expert].float()
    if topk_weights is not None:
        out = out * topk_weights.reshape(-1)[pairs].float().unsqueeze(1)
    c[pairs] = out.to(c.dtype)
