"""Triton LoRA shrink and expand for dense layers, with exactly the semantics
of ``torch_ops.lora_shrink`` / ``torch_ops.lora_expand``.

Design
------
The tokens of a step come grouped by adapter slot (``LoRATokenMapping``:
``sorted_token_ids`` with CSR-style ``slot_start``), so one program works on
BLOCK_M tokens of one slot and multiplies them by that slot's factor only.

Grids are static (they depend on shapes, never on device data) so that CUDA
graphs can capture the launches; every slot gets the upper bound of
``cdiv(T, BLOCK_M)`` token blocks and programs whose block starts past the
slot's run return at once:

- shrink: ``(cdiv(T, BLOCK_M), max_loras, S * SPLIT_K)``; program
  ``(m, slot, s * SPLIT_K + j)`` computes ``x[tokens] @ A_s[slot].T`` over
  the K blocks ``j, j + SPLIT_K, ...`` into ``out[s, tokens, :R]``. The whole
  rank sits in one tile (padded to >= 16 for ``tl.dot``, masked).
- expand: ``(cdiv(T, BLOCK_M), max_loras, S * cdiv(max N_s, BLOCK_N))``;
  program ``(m, slot, s * NB + n)`` adds ``inter[s, tokens] @ B_s[slot].T``
  for columns ``n * BLOCK_N...`` of slice s into
  ``y[tokens, off_s + ...]``; n blocks past ``N_s`` return at once. The rank
  is the whole reduction, so there is no K loop, and every output element
  has one writer: no atomics, deterministic.

All slices run in one launch. The slices' factors are separate tensors
(stacking them would copy weights every step, and the N_s of q/k/v differ),
so the kernels read a small int64 table with one row per slice: data
pointer, slot stride, expert stride, N_s and column offset. Tables are cached
by content (pointers, strides, sizes) and built (one host-to-device copy) the
first time a set of weight buffers is seen, so a warm-up step must run
before CUDA graph capture, as it does for Triton's compilation. Strides
inside one slot's matrix must be equal across slices and are plain kernel
arguments, which lets Triton specialise unit strides and vectorise loads.
Vectors also need the tile's base aligned, which Triton cannot see in
values read from the table: ``slice_table`` finds the alignment every
table value has and the kernels mark the loaded values with it
(``FACTOR_ALIGN``). Unmarked, the factor tiles loaded one element per
instruction, and the MoE shrink's factor tile could not be pipelined
(H100, Qwen3-30B-A3B layer, 4 x rank 16, 2048 tokens: LoRA 245 -> 186 us).

Decode has few tokens per slot, which leaves shrink (a thin [R, K] factor,
K in the thousands) with few programs that each walk all of K. ``SPLIT_K``
spreads K over more programs, each storing its fp32 partial sum in its own
part of a ``[SPLIT_K, S, T, R]`` shrink output; expand adds the parts up as
it loads them (SPLIT_K * R floats per row, nothing next to the weights it
reads). So shrink is always one launch, needs no zeroed buffer and no
atomics, and stays deterministic. A ``[S, T, R]`` output means one part.

16-bit operands go to ``tl.dot`` as they are (tensor cores, fp32
accumulation); expand rounds the fp32 shrink output to the factors' dtype
for that. fp32 uses ``input_precision="ieee"`` so it never drops to tf32.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from vllm.lora.token_mapping import LoRATokenMapping

# Columns of a slice table row: data pointer, slot stride, expert stride,
# N_s (expand) and column offset in the output (expand).
META_COLS = tl.constexpr(5)


@triton.jit
def slice_meta(meta_ptr, s, w0_ptr, ALIGN: tl.constexpr):
    """Slice s's table row as (factor pointer, slot stride, expert stride, N_s,
    column offset); ``w0_ptr`` (slice 0's factor) only gives the element type.
    ALIGN: ``slice_table``'s alignment, in elements, of every value in the
    table. Values read from memory are opaque to Triton's alignment
    analysis: unmarked, every factor tile (and the expand's output tile)
    would load one element per instruction instead of 16-byte vectors along
    its unit stride. (The marks must sit on the loads themselves: Triton
    drops them on a function's arguments.)"""
    row = meta_ptr + s * META_COLS
    w_ptr = tl.load(row).to(tl.pointer_type(w0_ptr.dtype.element_ty))
    stride_l = tl.load(row + 1)
    stride_e = tl.load(row + 2)
    n_s = tl.load(row + 3)
    col_off = tl.load(row + 4)
    if ALIGN > 1:
        w_ptr = tl.multiple_of(w_ptr, ALIGN * w0_ptr.dtype.element_ty.primitive_bitwidth // 8)
        stride_l = tl.multiple_of(stride_l, ALIGN)
        stride_e = tl.multiple_of(stride_e, ALIGN)
        n_s = tl.multiple_of(n_s, ALIGN)
        col_off = tl.multiple_of(col_off, ALIGN)
    return w_ptr, stride_l, stride_e, n_s, col_off


@triton.jit
def shrink_tile(x_ptr, w_ptr, rows, row_mask, K, R, split, stride_xt, stride_xk, stride_wr,
                stride_wk, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """x[rows] @ W.T over K blocks split, split + SPLIT_K, ... (W is [R, K])."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xt + offs_k[None, :] * stride_xk
    # W read as a K x R tile: the dot then gives x @ W.T
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_r[None, :] * stride_wr
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for kb in range(split, tl.cdiv(K, BLOCK_K), SPLIT_K):
        k0 = kb * BLOCK_K
        k_mask = offs_k < K - k0
        x = tl.load(x_ptrs + k0 * stride_xk, mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(w_ptrs + k0 * stride_wk, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def expand_add(inter_ptr, w_ptr, y_ptr, rows, row_mask, scale, col_off, n0, N, R,
               stride_ip, stride_it, stride_ir, stride_wn, stride_wr, stride_yt, stride_yn,
               INPUT_PRECISION: tl.constexpr, HAS_SCALE: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """y[rows, col_off + n0 + n] += (inter[rows] @ W.T)[:, n0 + n] (* scale per
    row), W being [N, R] and inter the sum of SPLIT_K parts ``stride_ip``
    apart; the sum is formed in fp32."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    r_mask = offs_r < R
    n_mask = offs_n < N
    a_ptrs = inter_ptr + rows[:, None] * stride_it + offs_r[None, :] * stride_ir
    a_mask = row_mask[:, None] & r_mask[None, :]
    a = tl.load(a_ptrs, mask=a_mask, other=0.0)
    for part in tl.static_range(1, SPLIT_K):
        a += tl.load(a_ptrs + part * stride_ip, mask=a_mask, other=0.0)
    w = tl.load(w_ptr + offs_r[:, None] * stride_wr + offs_n[None, :] * stride_wn,
                mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    delta = tl.dot(a.to(w.dtype), w, input_precision=INPUT_PRECISION)
    if HAS_SCALE:
        delta *= scale[:, None]
    y_ptrs = y_ptr + rows[:, None] * stride_yt + (col_off + offs_n)[None, :] * stride_yn
    y_mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _slot_rows(sorted_token_ids_ptr, start, run, pid_m, BLOCK_M: tl.constexpr):
    """Tokens of block pid_m of a slot's run (valid = inside the run)."""
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = offs < run
    tokens = tl.load(sorted_token_ids_ptr + start + offs, mask=valid, other=0).to(tl.int64)
    return tokens, valid


@triton.jit
def _lora_shrink_kernel(
        x_ptr, w0_ptr, meta_ptr, out_ptr, sorted_token_ids_ptr, slot_start_ptr,
        K, R, stride_xt, stride_xk, stride_wr, stride_wk, stride_op, stride_os, stride_ot,
        stride_or, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, FACTOR_ALIGN: tl.constexpr):
    pid_m = tl.program_id(0)
    slot = tl.program_id(1)
    s = tl.program_id(2) // SPLIT_K
    split = tl.program_id(2) % SPLIT_K
    start = tl.load(slot_start_ptr + slot)
    run = tl.load(slot_start_ptr + slot + 1) - start
    if pid_m * BLOCK_M >= run:
        return
    tokens, valid = _slot_rows(sorted_token_ids_ptr, start, run, pid_m, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    out_ptrs = (out_ptr + split.to(tl.int64) * stride_op + s.to(tl.int64) * stride_os
                + tokens[:, None] * stride_ot + offs_r[None, :] * stride_or)
    w_ptr, stride_wl, _, _, _ = slice_meta(meta_ptr, s, w0_ptr, FACTOR_ALIGN)
    acc = shrink_tile(x_ptr, w_ptr + slot * stride_wl, tokens, valid, K, R, split, stride_xt,
                      stride_xk, stride_wr, stride_wk, INPUT_PRECISION, BLOCK_M, BLOCK_R,
                      BLOCK_K, SPLIT_K)
    tl.store(out_ptrs, acc, mask=valid[:, None] & (offs_r < R)[None, :])


@triton.jit
def _lora_expand_kernel(
        inter_ptr, w0_ptr, meta_ptr, y_ptr, sorted_token_ids_ptr, slot_start_ptr,
        R, num_n_blocks, stride_ip, stride_is, stride_it, stride_ir, stride_wn, stride_wr,
        stride_yt, stride_yn,
        INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, FACTOR_ALIGN: tl.constexpr):
    pid_m = tl.program_id(0)
    slot = tl.program_id(1)
    s = tl.program_id(2) // num_n_blocks
    n0 = (tl.program_id(2) % num_n_blocks) * BLOCK_N
    w_ptr, stride_wl, _, N, col_off = slice_meta(meta_ptr, s, w0_ptr, FACTOR_ALIGN)
    if n0 >= N:
        return
    start = tl.load(slot_start_ptr + slot)
    run = tl.load(slot_start_ptr + slot + 1) - start
    if pid_m * BLOCK_M >= run:
        return
    tokens, valid = _slot_rows(sorted_token_ids_ptr, start, run, pid_m, BLOCK_M)
    expand_add(inter_ptr + s.to(tl.int64) * stride_is, w_ptr + slot * stride_wl, y_ptr, tokens,
               valid, 0.0, col_off, n0, N, R, stride_ip, stride_it, stride_ir, stride_wn,
               stride_wr, stride_yt, stride_yn, INPUT_PRECISION, False, BLOCK_R, BLOCK_N,
               SPLIT_K)


# Never evicted: a captured CUDA graph keeps reading the table at its address.
# Entries are a few bytes per set of weight buffers, which live for the run.
@functools.lru_cache(maxsize=None)
def _cached_table(rows: tuple[tuple[int, ...], ...], element_size: int,
                  device: torch.device) -> tuple[torch.Tensor, int]:
    return torch.tensor(rows, dtype=torch.int64, device=device), table_alignment(rows,
                                                                                element_size)


def table_alignment(rows: tuple[tuple[int, ...], ...], element_size: int) -> int:
    """The most elements (a power of two, at most 16 bytes' worth) that every
    value of a slice table's ``rows`` is a multiple of: data pointers (bytes,
    so ``element_size`` times that), slot and expert strides, N_s and column
    offsets."""
    align = max(1, 16 // element_size)
    while align > 1 and any(row[0] % (align * element_size) or any(v % align for v in row[1:])
                            for row in rows):
        align //= 2
    return align


def slice_table(weights: list[torch.Tensor], n_dim: int | None = None,
                slice_offsets: list[int] | None = None
                ) -> tuple[torch.Tensor, tuple[int, int], int]:
    """The per-slice table the kernels read (see the module docstring), the
    strides of the last two dims, which every slice must share, and the
    table's alignment (``table_alignment``, the kernels' FACTOR_ALIGN).

    ``weights`` are ``[L, ..., d0, d1]``; ``n_dim`` names the dim holding N_s
    (expand); a 4-dim weight's dim 1 is the expert."""
    if not weights:
        raise ValueError("no slices")
    w0 = weights[0]
    inner = (w0.stride(-2), w0.stride(-1))
    for w in weights:
        if w.dtype != w0.dtype or w.device != w0.device or w.dim() != w0.dim():
            raise ValueError("all slices need one dtype, device and number of dims")
        if (w.stride(-2), w.stride(-1)) != inner:
            raise ValueError(f"slices differ in inner strides: {(w.stride(-2), w.stride(-1))} "
                             f"vs {inner}")
        if w.dim() not in (3, 4) or w.shape[:-2] != w0.shape[:-2]:
            raise ValueError(f"slice shapes {tuple(w.shape)} and {tuple(w0.shape)} do not match")
    offsets = slice_offsets if slice_offsets is not None else [0] * len(weights)
    if len(offsets) != len(weights):
        raise ValueError(f"{len(weights)} slices but {len(offsets)} offsets")
    rows = tuple((w.data_ptr(), w.stride(0), w.stride(1) if w.dim() == 4 else 0,
                  w.shape[n_dim] if n_dim is not None else 0, int(off))
                 for w, off in zip(weights, offsets))
    table, align = _cached_table(rows, w0.element_size(), w0.device)
    return table, inner, align


def input_precision(dtype: torch.dtype) -> str:
    # fp32 must not silently drop to tf32; 16-bit inputs ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


def rank_block(R: int) -> int:
    # tl.dot needs every tile dimension >= 16
    return max(16, triton.next_power_of_2(R))


def shrink_block_k(K: int, R: int, block_m: int, dtype: torch.dtype) -> int:
    """Wide K tiles keep many bytes in flight per program; narrower for wide
    rank/token tiles and fp32 so the pipelined stages fit in shared memory."""
    block_k = 256 if rank_block(R) <= 32 and block_m <= 32 else 128
    if dtype.itemsize > 2:
        block_k //= 2
    return max(16, min(block_k, triton.next_power_of_2(K)))


def shrink_parts(out: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """The shrink output as ``[SPLIT_K, S, rows, R]`` parts: ``out`` is that,
    or ``[S, rows, R]`` for one part."""
    parts = out if out.dim() == 4 else out.unsqueeze(0)
    if out.dtype != torch.float32 or out.dim() not in (3, 4) or tuple(parts.shape[1:]) != shape:
        raise ValueError(f"the shrink output must be float32 [SPLIT_K, {', '.join(map(str, shape))}]"
                         f" or {list(shape)}, got {out.dtype} {list(out.shape)}")
    return parts


def split_config(config: dict[str, Any] | None, default: Callable[[], dict[str, Any]],
                 parts: torch.Tensor) -> dict[str, Any]:
    """The launch config: ``config`` (whose SPLIT_K must match the output's
    parts), else ``default()`` with SPLIT_K set by the parts."""
    if config is None:
        return {**default(), "SPLIT_K": parts.shape[0]}
    if config["SPLIT_K"] != parts.shape[0]:
        raise ValueError(f"SPLIT_K {config['SPLIT_K']} but the shrink output has "
                         f"{parts.shape[0]} parts")
    return config


def lora_shrink_config(num_tokens: int, K: int, R: int, dtype: torch.dtype) -> dict[str, int]:
    """Untuned launch parameters. Runs of one slot are at most T long and
    often much shorter with several adapters, so token blocks stay small.
    Decode-sized batches split K (see the module docstring) so a few tokens
    still get many programs."""
    block_m = 16 if num_tokens <= 64 else 32 if num_tokens <= 512 else 64
    block_k = shrink_block_k(K, R, block_m, dtype)
    split_k = min(8, max(1, triton.cdiv(K, block_k) // 2)) if num_tokens <= 128 else 1
    return {"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_K": block_k, "SPLIT_K": split_k,
            "num_warps": 4, "num_stages": 3}


def lora_expand_config(num_tokens: int, N: int) -> dict[str, int]:
    """Untuned launch parameters; narrow column blocks at decode give more
    programs to read B with."""
    block_m = 16 if num_tokens <= 64 else 32 if num_tokens <= 512 else 64
    block_n = 64 if num_tokens <= 128 else 128
    return {"BLOCK_SIZE_M": block_m,
            "BLOCK_SIZE_N": max(16, min(block_n, triton.next_power_of_2(N))), "num_warps": 4}


def _check_mapping(mapping: LoRATokenMapping, num_tokens: int) -> None:
    if mapping.num_tokens != num_tokens:
        raise ValueError(f"mapping has {mapping.num_tokens} tokens, the input {num_tokens}")
    if mapping.slot_start.numel() != mapping.max_loras + 1:
        raise ValueError("slot_start must have max_loras + 1 entries")


def lora_shrink_split(num_tokens: int, K: int, R: int, dtype: torch.dtype) -> int:
    """The SPLIT_K to size a shrink output with (parts of K summed by expand)."""
    return lora_shrink_config(num_tokens, K, R, dtype)["SPLIT_K"]


def lora_shrink(x: torch.Tensor, lora_a: list[torch.Tensor], mapping: LoRATokenMapping,
                out: torch.Tensor, config: dict[str, Any] | None = None) -> None:
    """``out[s, t] = x[t] @ lora_a[s][slot(t)].T`` for every token t with an
    adapter (x ``[T, K]``, ``lora_a[s]`` ``[L, R, K]``, out ``[S, T, R]``
    float32, or ``[SPLIT_K, S, T, R]``: partial sums over K that add up to
    it); other rows of ``out`` are not touched."""
    T, K = x.shape
    S = len(lora_a)
    _check_mapping(mapping, T)
    table, (stride_wr, stride_wk), align = slice_table(lora_a)
    w0 = lora_a[0]
    R = w0.shape[1]
    if w0.shape[2] != K or w0.shape[0] < mapping.max_loras:
        raise ValueError(f"lora_a {tuple(w0.shape)} does not fit x {tuple(x.shape)} and "
                         f"{mapping.max_loras} slots")
    parts = shrink_parts(out, (S, T, R))
    if x.dtype != w0.dtype:
        raise ValueError(f"x is {x.dtype} but the factors are {w0.dtype}")
    if T == 0:
        return
    config = split_config(config, lambda: lora_shrink_config(T, K, R, w0.dtype), parts)
    split_k, block_m = config["SPLIT_K"], config["BLOCK_SIZE_M"]
    _lora_shrink_kernel[(triton.cdiv(T, block_m), mapping.max_loras, S * split_k)](
        x, w0, table, parts, mapping.sorted_token_ids, mapping.slot_start, K, R,
        x.stride(0), x.stride(1), stride_wr, stride_wk, *parts.stride(),
        INPUT_PRECISION=input_precision(w0.dtype), BLOCK_M=block_m, BLOCK_R=rank_block(R),
        BLOCK_K=config["BLOCK_SIZE_K"], SPLIT_K=split_k, FACTOR_ALIGN=align,
        num_warps=config["num_warps"], num_stages=config["num_stages"])


def lora_expand(inter: torch.Tensor, lora_b: list[torch.Tensor], mapping: LoRATokenMapping,
                y: torch.Tensor, slice_offsets: list[int],
                config: dict[str, Any] | None = None) -> None:
    """``y[t, off_s : off_s + N_s] += inter[s, t] @ lora_b[s][slot(t)].T`` for
    every token t with an adapter (inter ``[S, T, R]`` or its
    ``[SPLIT_K, S, T, R]`` parts, ``lora_b[s]`` ``[L, N_s, R]``); the sum is
    formed in fp32 and rounded once to y's dtype. Other rows and columns of
    y are not touched."""
    S, T, R = inter.shape[-3:]
    parts = shrink_parts(inter, (S, T, R))
    _check_mapping(mapping, T)
    if len(lora_b) != S:
        raise ValueError(f"inter has {S} slices but there are {len(lora_b)} factors")
    table, (stride_wn, stride_wr), align = slice_table(lora_b, 1, slice_offsets)
    w0 = lora_b[0]
    if w0.shape[2] != R or w0.shape[0] < mapping.max_loras or y.shape[0] != T:
        raise ValueError(f"lora_b {tuple(w0.shape)}, inter {tuple(inter.shape)} and "
                         f"y {tuple(y.shape)} do not fit {mapping.max_loras} slots")
    for b, off in zip(lora_b, slice_offsets):
        if off < 0 or off + b.shape[1] > y.shape[1]:
            raise ValueError(f"slice [{off}, {off + b.shape[1]}) outside y's {y.shape[1]} columns")
    if T == 0:
        return
    max_n = max(b.shape[1] for b in lora_b)
    config = config or lora_expand_config(T, max_n)
    block_m, block_n = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"]
    num_n_blocks = triton.cdiv(max_n, block_n)
    _lora_expand_kernel[(triton.cdiv(T, block_m), mapping.max_loras, S * num_n_blocks)](
        parts, w0, table, y, mapping.sorted_token_ids, mapping.slot_start, R, num_n_blocks,
        *parts.stride(), stride_wn, stride_wr, y.stride(0), y.stride(1),
        INPUT_PRECISION=input_precision(w0.dtype), BLOCK_M=block_m, BLOCK_R=rank_block(R),
        BLOCK_N=block_n, SPLIT_K=parts.shape[0], FACTOR_ALIGN=align,
        num_warps=config["num_warps"])
