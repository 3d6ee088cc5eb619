"""LoRA computed inside the expert GEMM: the pieces of
``_fused_moe_gemm_kernel`` that add a projection's adapter deltas before
its tile is stored, so no LoRA kernel runs after the GEMM.

Why: with separate kernels, a MoE layer's LoRA costs up to five extra
launches (slot alignment, shrink and expand for each projection) and a
read-modify-write of both GEMM outputs. At decode the launches dominate
(20 µs on 63 at one token on the H100); from a few thousand tokens the
round trips do (benchmarks/RESULTS.md, "floors").

How: the GEMM's blocks are the base alignment's, one expert each, whose
rows may run different adapter slots. The L slots' factors of the block's
expert are taken side by side as one rank-``L*R`` factor: column
``c = l * BLOCK_R + r`` is rank r of slot l. A row's own slot selects its
columns (the others are zeroed), so one ``tl.dot`` of width ``L*R`` serves
all the slots of a block. Factor columns of slots that no row of the block
runs with are masked in the loads: they cost MMA width, not bytes.

- fusion "gemm" (``lora_a`` given): each K step also multiplies the
  activation tile it already loaded by the A tile, ``[BLOCK_K, L*R]``. No
  launch and no extra activation read, but every column block of the
  output repeats the shrink, and on the H100 the wider loop lost to the
  other placements at every size measured.
- fusion "epilogue" (``inter`` given): the shrink ran before
  (``fused_moe_lora_shrink``, with its own slot alignment) and the epilogue
  reads its ``[SPLIT_K, S, T*k, R]`` output: one row of R floats per pair
  instead of a read-modify-write pass over the GEMM output.
- fusion "loop" (``inter`` given, ``inter_spread``): the aligned shrink
  wrote each pair's row into its slot's columns of ``[S, T*k, L*R]`` (zeros
  elsewhere), which is the ``t`` below already; the K loop runs
  ``cdiv(L*R, BLOCK_K)`` more steps that multiply those columns by the
  side-by-side B rows (LORA_MODE 3, ``lora_loop_step``). The factor tiles
  then go through the loop's software pipeline, issued stages ahead like
  the weight tiles, where the epilogue waits a round trip for them after
  the loop with one program per SM at the widest tiles. No flags, slots
  or reductions: the zeros select.

In the first two the epilogue forms ``t [BLOCK_M, L*R]`` and adds
``t @ B_tile [L*R, BLOCK_N]`` in fp32 to the accumulator, so bias and
routing weight apply to base and delta alike and the sum is rounded once.
Blocks of 64 rows and more (``LORA_PER_SLOT``, shrink done) add one
rank-R dot per slot instead: ``t`` and the side-by-side factor tile with its
pointers spilled registers beside those accumulators (40% slower GEMMs at
128 x 256 tiles), the per-slot tiles do not.

The LoRA operands of a block sit behind dependent small loads, each a DRAM
round trip when the L2 is cold. The slice table's rows are read all at once
and the adapter flags as one vector, so the factor tiles wait only for the
rows' slots (pair -> slot -> tile; the flags are applied to the rows after
the loop). ``LORA_EARLY`` issues these loads before the K loop so they
overlap the weight stream (measured as fast or faster at 16- and 64-row
blocks); the widest blocks load them after the loop, keeping the loop's
registers free.

When the shrink output is written by the kernel launched just before the
GEMM (``inter_in_flight``: the w13 shrink by pair), the GEMM is launched
as a programmatic dependent of it (Hopper and newer): its programs start
while the shrink runs, read only what earlier kernels wrote (routing,
alignment, weights) until ``gdc_wait`` after the K loop, and then read the
shrink rows. Every program, inactive ones too, waits before it ends or
writes, so the GEMM finishing still means the shrink has finished.

A program's column block must lie inside one slice (gate or up): the
caller picks BLOCK_N so that slice boundaries fall on block boundaries.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import triton
import triton.language as tl

from vllm.lora.ops.triton_ops.lora_ops import (input_precision, rank_block, shrink_parts,
                                               slice_meta, slice_table)
from vllm.triton_utils import supports_pdl

# Widest side-by-side factor (L * BLOCK_R) the kernel takes: beyond it the
# in-register tile [BLOCK_M, L*R] gets too large; callers fall back to the
# separate LoRA kernels.
MAX_FUSED_WIDTH = 256


@dataclass
class MoELoRAGemmFusion:
    """One projection's LoRA for the expert GEMM to add (see the module
    docstring). Exactly one of ``lora_a`` (shrink in the GEMM) and ``inter``
    (shrink done) is set."""
    token_lora_slot: torch.Tensor           # [T] int32, -1 = no adapter
    adapter_enabled: torch.Tensor           # [L]
    lora_b: list[torch.Tensor]              # per slice [L, E, N_s, R]
    slice_offsets: list[int]                # first GEMM output column of each slice
    top_k: int
    lora_a: list[torch.Tensor] | None = None  # per slice [L, E, R, K]
    inter: torch.Tensor | None = None       # [SPLIT_K, S, T*k, R] or [S, T*k, R] fp32
    # ``inter`` is [S, T*k, fused_width] in the factors' dtype instead: each
    # pair's shrink in its slot's columns, zeros elsewhere and in the rows of
    # pairs without an adapter or whose adapter skips the layer; the GEMM
    # adds the expand as extra K steps (``lora_loop_step``)
    inter_spread: bool = False
    # ``inter`` is written by the kernel launched just before the GEMM, which
    # then starts early and waits for it (see the module docstring)
    inter_in_flight: bool = False

    @property
    def num_slots(self) -> int:
        return self.lora_b[0].shape[0]

    @property
    def rank(self) -> int:
        return self.lora_b[0].shape[3]


def fused_width(num_slots: int, rank: int) -> int:
    """Columns of the side-by-side factor tile."""
    return triton.next_power_of_2(num_slots) * rank_block(rank)


def slice_boundaries(slice_offsets: list[int], lora_b: list[torch.Tensor], N: int) -> list[int]:
    """The slices' edges strictly inside the GEMM's N output columns: no
    column block may straddle one."""
    return [b for off, w in zip(slice_offsets, lora_b) for b in (off, off + w.shape[2])
            if 0 < b < N]


def fusion_block_n(lora: MoELoRAGemmFusion, block_n: int, N: int) -> int:
    """The widest column block <= ``block_n`` (power of two, >= 16) that
    never straddles a slice boundary."""
    bounds = slice_boundaries(lora.slice_offsets, lora.lora_b, N)
    while block_n > 16 and any(b % block_n for b in bounds):
        block_n //= 2
    if any(b % block_n for b in bounds):
        raise ValueError(f"slice boundaries {bounds} are not multiples of 16: the expert GEMM "
                         "cannot add this LoRA")
    return block_n


# The kernel arguments of a GEMM without LoRA (read-only: copied, never changed).
NO_LORA_KERNEL_ARGS: Mapping[str, Any] = MappingProxyType(dict(
    lora_slot_ptr=None, lora_enabled_ptr=None, lora_a0_ptr=None, lora_a_meta_ptr=None,
    lora_b0_ptr=None, lora_b_meta_ptr=None, lora_inter_ptr=None, lora_num_slots=0,
    lora_rank=0, stride_lar=0, stride_lak=0, stride_lbn=0, stride_lbr=0, stride_li_part=0,
    stride_li_s=0, stride_li_p=0, stride_li_r=0, LORA_MODE=0, LORA_EARLY=False,
    LORA_PER_SLOT=False, LORA_WAIT=False, LORA_NUM_SLICES=1, LORA_SPLIT_K=1, LORA_BLOCK_L=1,
    LORA_BLOCK_R=16, LORA_PRECISION="ieee", LORA_FACTOR_ALIGN=1, LORA_STEPS=0))


def lora_early_default(block_m: int) -> bool:
    """Early measured faster (or equal) at blocks of 16 and 64 rows on the
    H100; the widest blocks keep the loop's registers free (per slot, early
    at 128-row blocks: Qwen3-30B-A3B layer at 2048 tokens 0.736 -> 0.790 ms)."""
    return block_m <= 64


def lora_per_slot_default(block_m: int) -> bool:
    """One dot per slot in the epilogue from 64-row blocks (see
    ``lora_add_per_slot``): on the H100 at 512 tokens of a Qwen3-30B-A3B
    layer (64-row blocks) it beat the side-by-side dot before or after the
    loop by 10-30%, and at 2048-8192 (128-row blocks) by 8-40%: the
    side-by-side tiles spill registers there."""
    return block_m >= 64


def lora_kernel_args(lora: MoELoRAGemmFusion, a: torch.Tensor, num_valid_pairs: int,
                     N: int, block_k: int, early: bool, per_slot: bool) -> dict[str, Any]:
    """The LoRA arguments of ``_fused_moe_gemm_kernel`` (LORA_MODE 1: shrink
    in the K loop, 2: shrink output read in the epilogue, 3: spread shrink
    output multiplied in extra K steps), after checking that the factors fit
    the GEMM's input ``a`` and N output columns.
    ``block_k``: the GEMM's BLOCK_SIZE_K (mode 3 runs ``L*R / block_k``
    more steps); ``early``: LORA_EARLY (always with the shrink in the loop;
    with ``per_slot`` every operand but the factor tiles); ``per_slot``:
    LORA_PER_SLOT (mode 2 only)."""
    if (lora.lora_a is None) == (lora.inter is None):
        raise ValueError("give exactly one of lora_a (shrink in the GEMM) and inter")
    b_table, (stride_bn, stride_br), b_align = slice_table(lora.lora_b, 2, lora.slice_offsets)
    b0 = lora.lora_b[0]
    L, R, S = lora.num_slots, lora.rank, len(lora.lora_b)
    if b0.dim() != 4 or b0.dtype != a.dtype:
        raise ValueError(f"lora_b {tuple(b0.shape)} {b0.dtype} is no [L, E, N_s, R] factor "
                         f"of the GEMM's dtype {a.dtype}")
    for b, off in zip(lora.lora_b, lora.slice_offsets):
        if off < 0 or off + b.shape[2] > N:
            raise ValueError(f"slice [{off}, {off + b.shape[2]}) outside the GEMM's {N} columns")
    if fused_width(L, R) > MAX_FUSED_WIDTH:
        raise ValueError(f"{L} slots of rank {R} are wider than {MAX_FUSED_WIDTH} columns")
    if lora.adapter_enabled.numel() < L:
        raise ValueError(f"adapter_enabled has {lora.adapter_enabled.numel()} entries for {L} "
                         "slots")
    if lora.inter_in_flight and not supports_pdl(a.device):
        raise ValueError(f"a shrink in flight needs programmatic dependent launch, which "
                         f"{a.device} lacks")
    if lora.token_lora_slot.numel() * lora.top_k != num_valid_pairs:
        raise ValueError(f"{lora.token_lora_slot.numel()} token slots for {num_valid_pairs} "
                         f"pairs, top_k {lora.top_k}")
    args = dict(NO_LORA_KERNEL_ARGS, lora_slot_ptr=lora.token_lora_slot,
                lora_enabled_ptr=lora.adapter_enabled, lora_b0_ptr=b0, lora_b_meta_ptr=b_table,
                lora_num_slots=L, lora_rank=R, stride_lbn=stride_bn, stride_lbr=stride_br,
                LORA_NUM_SLICES=S,
                LORA_BLOCK_L=triton.next_power_of_2(L), LORA_BLOCK_R=rank_block(R),
                LORA_PRECISION=input_precision(b0.dtype), LORA_EARLY=early,
                LORA_FACTOR_ALIGN=b_align)
    if lora.lora_a is not None:
        a_table, (stride_ar, stride_ak), a_align = slice_table(lora.lora_a)
        a0 = lora.lora_a[0]
        if len(lora.lora_a) != S or a0.shape[:3] != b0.shape[:2] + (R,) or \
                a0.shape[3] != a.shape[1] or a0.dtype != a.dtype:
            raise ValueError(f"lora_a {tuple(a0.shape)} does not fit lora_b "
                             f"{tuple(b0.shape)} and the GEMM input {tuple(a.shape)}")
        return dict(args, lora_a0_ptr=a0, lora_a_meta_ptr=a_table, stride_lar=stride_ar,
                    stride_lak=stride_ak, LORA_MODE=1, LORA_EARLY=True,
                    LORA_FACTOR_ALIGN=min(a_align, b_align))
    if lora.inter_spread:
        width = fused_width(L, R)
        if lora.inter_in_flight:
            raise ValueError("a spread shrink output cannot be in flight")
        if lora.inter.shape != (S, num_valid_pairs, width) or lora.inter.dtype != b0.dtype or \
                lora.inter.stride(2) != 1:
            raise ValueError(f"the spread shrink output must be {b0.dtype} [{S}, "
                             f"{num_valid_pairs}, {width}] with contiguous rows, got "
                             f"{lora.inter.dtype} {list(lora.inter.shape)}")
        return dict(args, lora_inter_ptr=lora.inter, stride_li_s=lora.inter.stride(0),
                    stride_li_p=lora.inter.stride(1), LORA_MODE=3, LORA_EARLY=False,
                    LORA_STEPS=triton.cdiv(width, block_k))
    parts = shrink_parts(lora.inter, (S, num_valid_pairs, R))
    return dict(args, lora_inter_ptr=parts, stride_li_part=parts.stride(0),
                stride_li_s=parts.stride(1), stride_li_p=parts.stride(2),
                stride_li_r=parts.stride(3), LORA_MODE=2, LORA_SPLIT_K=parts.shape[0],
                LORA_PER_SLOT=per_slot, LORA_WAIT=lora.inter_in_flight)


@triton.jit
def lora_slot_loads(slot_ptr, enabled_ptr, num_slots, pair, pair_mask, top_k,
                    BLOCK_L: tl.constexpr):
    """The rows' slots (-1 without an adapter) and every slot's adapter flag
    [BLOCK_L]: loads that wait for nothing but the block's pairs."""
    slot = tl.load(slot_ptr + pair // top_k, mask=pair_mask, other=-1)
    offs_l = tl.arange(0, BLOCK_L)
    enabled = tl.load(enabled_ptr + offs_l, mask=offs_l < num_slots, other=0) != 0
    return slot, enabled


@triton.jit
def lora_row_slots(slot, enabled, BLOCK_L: tl.constexpr):
    """Each row's slot, -1 without an adapter or when its adapter skips the
    layer."""
    runs = (slot[:, None] == tl.arange(0, BLOCK_L)[None, :]) & enabled[None, :]
    return tl.where(tl.max(runs.to(tl.int32), axis=1) > 0, slot, -1)


@triton.jit
def bit_or(a, b):
    return a | b


@triton.jit
def lora_slot_bits(slot, enabled, BLOCK_L: tl.constexpr):
    """``lora_row_slots`` with bit sets: -> (each row's slot, -1 without an
    adapter or when its adapter skips the layer; the slots some row runs
    with, bit l for slot l). Two reductions over vectors, where the
    [BLOCK_M, BLOCK_L] form needs another to ask about each slot."""
    enabled_bits = tl.reduce(tl.where(enabled, 1 << tl.arange(0, BLOCK_L), 0), 0, bit_or)
    row_on = (slot >= 0) & (((enabled_bits >> tl.maximum(slot, 0)) & 1) != 0)
    slot_bits = tl.reduce(tl.where(row_on, 1 << tl.maximum(slot, 0), 0), 0, bit_or)
    return tl.where(row_on, slot, -1), slot_bits


@triton.jit
def lora_slice(meta_ptr, offs_n, w0_ptr, NUM_SLICES: tl.constexpr, ALIGN: tl.constexpr):
    """The slice the program's columns lie in, picked from every table row
    at once so that no load waits for another: -> (slice, whether there is
    one, factor pointer, slot stride, expert stride, N_s, column offset).
    ALIGN: the table's alignment (``slice_table``)."""
    # every row is loaded before the reduction for n0, whose barrier would
    # otherwise hold the loads back
    rows = ()
    for i in tl.static_range(NUM_SLICES):
        rows = rows + (slice_meta(meta_ptr, i, w0_ptr, ALIGN),)
    n0 = tl.min(offs_n, axis=0)
    s = tl.zeros((), dtype=tl.int32) - 1
    ptr = w0_ptr
    stride_l = tl.zeros((), dtype=tl.int64)
    stride_e = tl.zeros((), dtype=tl.int64)
    n_s = tl.zeros((), dtype=tl.int64)
    col_off = tl.zeros((), dtype=tl.int64)
    for i in tl.static_range(NUM_SLICES):
        ptr_i, stride_l_i, stride_e_i, n_i, off_i = rows[i]
        hit = (n0 >= off_i) & (n0 < off_i + n_i)
        s = tl.where(hit, i, s)
        ptr = tl.where(hit, ptr_i, ptr)
        stride_l = tl.where(hit, stride_l_i, stride_l)
        stride_e = tl.where(hit, stride_e_i, stride_e)
        n_s = tl.where(hit, n_i, n_s)
        col_off = tl.where(hit, off_i, col_off)
    return tl.maximum(s, 0), s >= 0, ptr, stride_l, stride_e, n_s, col_off


@triton.jit
def lora_factor_mask(row_slot, in_slice, num_slots, R, BLOCK_L: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    """[BLOCK_L, BLOCK_R]: rank < R of the slots some row runs with, none
    when the column block is in no slice."""
    offs_l = tl.arange(0, BLOCK_L)
    run = tl.max((row_slot[:, None] == offs_l[None, :]).to(tl.int32), axis=0) > 0
    slots = run & (offs_l < num_slots) & in_slice
    return slots[:, None] & (tl.arange(0, BLOCK_R) < R)[None, :]


@triton.jit
def own_slot_columns(t, row_slot, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    """Zero the columns of ``t`` [BLOCK_M, L*R] outside each row's slot."""
    t = tl.reshape(t, (BLOCK_M, BLOCK_L, BLOCK_R))
    own = row_slot[:, None] == tl.arange(0, BLOCK_L)[None, :]
    t = tl.where(own[:, :, None], t, 0.0)
    return tl.reshape(t, (BLOCK_M, BLOCK_L * BLOCK_R))


@triton.jit
def own_slot_spread(t, row_slot, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    """Shrink rows ``t`` [BLOCK_M, R] placed in their slot's columns of
    [BLOCK_M, L*R]. A select, so rows without an adapter may hold anything
    (the shrinks do not write them)."""
    own = row_slot[:, None] == tl.arange(0, BLOCK_L)[None, :]
    t = tl.where(own[:, :, None], t[:, None, :], 0.0)
    return tl.reshape(t, (BLOCK_M, BLOCK_L * BLOCK_R))


@triton.jit
def lora_shrink_factor_tile(a_ptr, stride_al, factor_mask, k0, K, stride_ar, stride_ak,
                            BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
                            BLOCK_R: tl.constexpr):
    """The side-by-side A tile ``[BLOCK_K, L*R]`` of K block k0."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_l = tl.arange(0, BLOCK_L)
    offs_r = tl.arange(0, BLOCK_R)
    ptrs = (a_ptr + offs_k[:, None, None] * stride_ak + offs_l[None, :, None] * stride_al
            + offs_r[None, None, :] * stride_ar)
    a = tl.load(ptrs, mask=(offs_k < K)[:, None, None] & factor_mask[None, :, :], other=0.0)
    return tl.reshape(a, (BLOCK_K, BLOCK_L * BLOCK_R))


@triton.jit
def lora_shrink_rows(inter_ptr, s, pair, pair_mask, R, stride_part, stride_s, stride_p,
                     stride_r, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_R: tl.constexpr, LOAD: tl.constexpr):
    """The finished shrink of the block's pairs, [BLOCK_M, BLOCK_R] fp32 (the
    SPLIT_K parts added up), whatever their slot: rows without an adapter
    are unwritten and must be selected away. Zeros without LOAD (the shrink
    is still running: the caller loads the rows once it is done)."""
    offs_r = tl.arange(0, BLOCK_R)
    ptrs = inter_ptr + s * stride_s + pair[:, None] * stride_p + offs_r[None, :] * stride_r
    mask = pair_mask[:, None] & (offs_r < R)[None, :]
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if LOAD:
        for part in tl.static_range(SPLIT_K):
            t += tl.load(ptrs + part * stride_part, mask=mask, other=0.0)
    return t


@triton.jit
def lora_expand_factor_tile(factor_mask, b_ptr, stride_bl, col_off, n_s, offs_n, n_mask,
                            stride_bn, stride_br, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr):
    """The side-by-side B tile ``[L*R, BLOCK_N]`` of the program's columns
    (loaded as [L, R, BLOCK_N]: rank is B's contiguous dim)."""
    n_in = offs_n - col_off
    offs_l = tl.arange(0, BLOCK_L)
    offs_r = tl.arange(0, BLOCK_R)
    ptrs = (b_ptr + offs_l[:, None, None] * stride_bl + offs_r[None, :, None] * stride_br
            + n_in[None, None, :] * stride_bn)
    n_ok = n_mask & (n_in >= 0) & (n_in < n_s)
    b = tl.load(ptrs, mask=factor_mask[:, :, None] & n_ok[None, None, :], other=0.0)
    return tl.reshape(b, (BLOCK_L * BLOCK_R, offs_n.shape[0]))


@triton.jit
def lora_operands(slot_ptr, enabled_ptr, a0_ptr, a_meta_ptr, b0_ptr, b_meta_ptr, inter_ptr,
                  num_slots, R, expert, pair, pair_mask, top_k, offs_n, n_mask, stride_bn,
                  stride_br, stride_i_part, stride_i_s, stride_i_p, stride_i_r,
                  LORA_MODE: tl.constexpr, NUM_SLICES: tl.constexpr, SPLIT_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
                  SHRINK_ROWS: tl.constexpr, FACTOR_ALIGN: tl.constexpr):
    """Everything the K loop (LORA_MODE 1) and the side-by-side epilogue
    read: -> (row slots (mode 2: before the adapter flags, see
    ``lora_side_by_side_delta``), adapter flags, factor mask, A pointer, A's
    slot stride, B tile, shrink: zeros to accumulate into (mode 1) or the
    block's rows (mode 2; zeros without SHRINK_ROWS: the caller loads them
    once the shrink is done), the column block's slice).

    Mode 2 masks the B tile by the slots the rows carry, before their
    adapter flags, and loads the shrink rows of every pair, so no load waits
    for a flag: issued before the K loop, they overlap it instead of a chain
    of dependent round trips (pair -> slot -> adapter flag -> tile) delaying
    it. (Loading every slot's tile, to wait for nothing but the pairs, read
    4x the factor bytes at 8-128 tokens and measured slower there.) Mode 1
    reads A every K step, so it masks by the rows' flagged slots."""
    slot, enabled = lora_slot_loads(slot_ptr, enabled_ptr, num_slots, pair, pair_mask, top_k,
                                    BLOCK_L)
    s, in_slice, b_ptr, stride_bl, stride_be, n_s, col_off = lora_slice(
        b_meta_ptr, offs_n, b0_ptr, NUM_SLICES, FACTOR_ALIGN)
    b_ptr += expert * stride_be
    if LORA_MODE == 1:
        row_slot = lora_row_slots(slot, enabled, BLOCK_L)
        factor_mask = lora_factor_mask(row_slot, in_slice, num_slots, R, BLOCK_L, BLOCK_R)
        a_ptr, stride_al, stride_ae, _, _ = slice_meta(a_meta_ptr, s, a0_ptr, FACTOR_ALIGN)
        a_ptr += expert * stride_ae
        t = tl.zeros((BLOCK_M, BLOCK_L * BLOCK_R), dtype=tl.float32)
    else:
        row_slot = slot
        factor_mask = lora_factor_mask(slot, in_slice, num_slots, R, BLOCK_L, BLOCK_R)
        a_ptr = b_ptr
        stride_al = stride_bl
        t = lora_shrink_rows(inter_ptr, s, pair, pair_mask, R, stride_i_part, stride_i_s,
                             stride_i_p, stride_i_r, SPLIT_K, BLOCK_M, BLOCK_R, SHRINK_ROWS)
    b = lora_expand_factor_tile(factor_mask, b_ptr, stride_bl, col_off, n_s, offs_n, n_mask,
                                stride_bn, stride_br, BLOCK_L, BLOCK_R)
    return row_slot, enabled, factor_mask, a_ptr, stride_al, b, t, s


@triton.jit
def lora_side_by_side_delta(acc, lora_acc, row_slot, enabled, b, LORA_MODE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
                            BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """``acc`` plus ``t @ B_tile``, t the rows' shrink in their own slot's
    columns: mode 1 keeps each row's own columns of the every-slot shrink,
    mode 2 spreads the shrink rows, applying the adapter flags only now."""
    if LORA_MODE == 1:
        t = own_slot_columns(lora_acc, row_slot, BLOCK_M, BLOCK_L, BLOCK_R)
    else:
        t = own_slot_spread(lora_acc, lora_row_slots(row_slot, enabled, BLOCK_L), BLOCK_M,
                            BLOCK_L, BLOCK_R)
    # rounded to the factors' dtype for the dot, as the separate expand does
    return tl.dot(t.to(b.dtype), b, acc, input_precision=PRECISION)


@triton.jit
def lora_per_slot_operands(slot_ptr, enabled_ptr, b0_ptr, b_meta_ptr, inter_ptr, num_slots, R,
                           expert, pair, pair_mask, top_k, offs_n, n_mask, stride_i_part,
                           stride_i_s, stride_i_p, stride_i_r, NUM_SLICES: tl.constexpr,
                           SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
                           BLOCK_R: tl.constexpr, SHRINK_ROWS: tl.constexpr,
                           FACTOR_ALIGN: tl.constexpr):
    """The per-slot epilogue's operands but the factor tiles: -> (row slots,
    the slots some row runs with as bits (none outside a slice), B base
    pointer, B's slot stride, B column of each output column, its mask, the
    column block's slice, the block's shrink rows [BLOCK_M, BLOCK_R] in the
    factors' dtype (zeros without SHRINK_ROWS: the caller loads them once
    the shrink is done)). Every load is issued before the first reduction,
    so the factor tiles wait for one round trip."""
    slot, enabled = lora_slot_loads(slot_ptr, enabled_ptr, num_slots, pair, pair_mask, top_k,
                                    BLOCK_L)
    s, in_slice, b_ptr, stride_bl, stride_be, n_s, col_off = lora_slice(
        b_meta_ptr, offs_n, b0_ptr, NUM_SLICES, FACTOR_ALIGN)
    t = lora_shrink_rows(inter_ptr, s, pair, pair_mask, R, stride_i_part, stride_i_s, stride_i_p,
                         stride_i_r, SPLIT_K, BLOCK_M, BLOCK_R, SHRINK_ROWS)
    row_slot, slot_bits = lora_slot_bits(slot, enabled, BLOCK_L)
    n_in = offs_n - col_off
    n_ok = n_mask & (n_in >= 0) & (n_in < n_s)
    # rounded to the factors' dtype, as the separate expand does
    return (row_slot, tl.where(in_slice, slot_bits, 0), b_ptr + expert * stride_be, stride_bl,
            n_in, n_ok, s, t.to(b0_ptr.dtype.element_ty))


@triton.jit
def lora_add_per_slot(acc, row_slot, slot_bits, b_ptr, stride_bl, n_in, n_ok, t, R,
                      stride_bn, stride_br, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
                      PRECISION: tl.constexpr):
    """``acc`` plus the block's deltas, one rank-R dot per slot (the
    wide-tile form: the side-by-side ``[L*R, BLOCK_N]`` factor tile and its
    pointers would not fit in registers beside a 128 x 256 accumulator).
    Every slot's tile is loaded before the first dot, so the loads are in
    flight together (each dot stages its tile in shared memory, which would
    otherwise hold the next load back); tiles of slots no row runs with
    load nothing."""
    offs_r = tl.arange(0, BLOCK_R)
    tiles = ()
    for slot in tl.static_range(BLOCK_L):
        on = ((slot_bits >> slot) & 1) != 0
        tiles = tiles + (tl.load(b_ptr + slot * stride_bl + offs_r[:, None] * stride_br
                                 + n_in[None, :] * stride_bn,
                                 mask=((offs_r < R)[:, None] & n_ok[None, :]) & on, other=0.0),)
    for slot in tl.static_range(BLOCK_L):
        acc = tl.dot(tl.where((row_slot == slot)[:, None], t, 0.0), tiles[slot], acc,
                     input_precision=PRECISION)
    return acc


@triton.jit
def lora_loop_operands(b0_ptr, b_meta_ptr, inter_ptr, expert, pair, offs_n, n_mask, stride_i_s,
                       stride_i_p, stride_bn, NUM_SLICES: tl.constexpr,
                       FACTOR_ALIGN: tl.constexpr):
    """What the LoRA K steps (``lora_loop_step``) read from: -> (the block's
    rows of the spread shrink output of the column block's slice, the
    slice's B factor of the block's expert, its slot stride, each output
    column's offset in it, the columns' mask)."""
    s, in_slice, b_ptr, stride_bl, stride_be, n_s, col_off = lora_slice(
        b_meta_ptr, offs_n, b0_ptr, NUM_SLICES, FACTOR_ALIGN)
    n_in = offs_n - col_off
    n_ok = n_mask & (n_in >= 0) & (n_in < n_s) & in_slice
    return (inter_ptr + s * stride_i_s + pair * stride_i_p, b_ptr + expert * stride_be,
            stride_bl, n_in * stride_bn, n_ok)


@triton.jit
def lora_loop_step(kb, num_k_blocks, K, a_rows, stride_ak, pair_mask, b_ptr, stride_bk,
                   b_cols, n_mask, t_rows, f_ptr, stride_bl, f_cols, f_col_mask, num_slots, R,
                   stride_br, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    """Pointers and masks of K step ``kb``'s tiles: the weights' while
    ``kb < num_k_blocks``, then the spread shrink rows' columns
    ``[j * BLOCK_K, (j + 1) * BLOCK_K)`` (j = kb - num_k_blocks) and the
    side-by-side B rows that match them (column c = slot * BLOCK_R + rank).
    The LoRA delta so joins the pipelined loop, its loads issued stages
    ahead like the weights', instead of a round trip after it. Both tiles
    are chosen as a row and a column vector (``a_rows``, ``b_cols``: the
    weights' base pointers and offsets per row / column), so no second
    pointer tile stays live across the loop."""
    lora = kb >= num_k_blocks
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    c = k - num_k_blocks * BLOCK_K
    slot = c // BLOCK_R
    r = c % BLOCK_R
    a_ptrs = (tl.where(lora, t_rows, a_rows)[:, None]
              + tl.where(lora, c, k * stride_ak)[None, :])
    a_mask = pair_mask[:, None] & tl.where(lora, c < BLOCK_L * BLOCK_R, k < K)[None, :]
    b_ptrs = (tl.where(lora, f_ptr, b_ptr)
              + tl.where(lora, slot * stride_bl + r * stride_br, k * stride_bk)[:, None]
              + tl.where(lora, f_cols, b_cols)[None, :])
    b_mask = (tl.where(lora, (slot < num_slots) & (r < R), k < K)[:, None]
              & tl.where(lora, f_col_mask, n_mask)[None, :])
    return a_ptrs, a_mask, b_ptrs, b_mask


def moe_lora_gemm_delta_torch(lora: MoELoRAGemmFusion, a: torch.Tensor, pairs: torch.Tensor,
                              expert: int, gather_rows: bool, N: int) -> torch.Tensor:
    """Reference of what the kernel adds for ``pairs`` of ``expert``:
    [len(pairs), N] float32."""
    delta = torch.zeros(pairs.numel(), N, dtype=torch.float32, device=a.device)
    slots = lora.token_lora_slot.long()[pairs // lora.top_k]
    enabled = lora.adapter_enabled.bool()
    slots = torch.where(enabled[slots.clamp(min=0)] & (slots >= 0), slots, -1)
    if lora.inter_spread:
        inter = lora.inter.float()
    elif lora.inter is not None:
        S = len(lora.lora_b)
        inter = shrink_parts(lora.inter, (S, lora.inter.shape[-2], lora.rank)).sum(0)
    for slot in slots.unique().tolist():
        if slot < 0:
            continue
        sel = slots == slot
        for s, (b, off) in enumerate(zip(lora.lora_b, lora.slice_offsets)):
            if lora.lora_a is not None:
                rows = pairs[sel] // lora.top_k if gather_rows else pairs[sel]
                t = a[rows].float() @ lora.lora_a[s][slot, expert].float().T
            elif lora.inter_spread:
                col = slot * rank_block(lora.rank)
                t = inter[s, pairs[sel], col:col + lora.rank]
            else:
                t = inter[s, pairs[sel]]
            rows_out = torch.nonzero(sel).squeeze(1)
            delta[rows_out, off:off + b.shape[2]] += t @ b[slot, expert].float().T
    return delta
