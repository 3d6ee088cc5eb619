"""Triton block alignment of routed pairs: the output contract (and the
torch reference) is in ``moe_align.py``.

One launch per call. Program ``s`` aligns the pairs of adapter slot ``s``
(the plain variant is one program over all pairs); it walks the pairs twice
in chunks, in pair order, which is what keeps pairs sorted by index within
an expert without any atomics:

1. count the pairs of every expert;
2. turn the counts into padded run starts (a prefix sum over experts) and
   scatter each pair to ``start[e] + (pairs of e seen so far)``;
3. write the sentinel into every expert's padding and the unused tail, and
   the expert (or -1) of every block.

Every output element is written exactly once, so the phases need no barrier
and the buffers no separate fill.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm.model_executor.layers.fused_moe.moe_align import max_padded_pairs

# Elements of the [chunk, experts] tiles a program handles at once: small
# enough to stay in registers.
_TILE_ELEMENTS = 4096


@triton.jit
def _chunk_one_hot(c, topk_ids_ptr, token_slot_ptr, slot, num_pairs, top_k, experts,
                   HAS_SLOT: tl.constexpr, CHUNK: tl.constexpr):
    """Pairs of chunk c, their expert (-1: past the end or another slot's)
    and the [CHUNK, experts] one-hot of the expert."""
    pair = c * CHUNK + tl.arange(0, CHUNK)
    valid = pair < num_pairs
    e = tl.load(topk_ids_ptr + pair, mask=valid, other=-1).to(tl.int32)
    if HAS_SLOT:
        s = tl.load(token_slot_ptr + pair // top_k, mask=valid, other=-1)
        e = tl.where(s == slot, e, -1)
    return pair, e, (e[:, None] == experts[None, :]).to(tl.int32)


@triton.jit
def _moe_align_kernel(topk_ids_ptr, token_slot_ptr, sorted_ids_ptr, expert_ids_ptr, total_ptr,
                      num_pairs, top_k, block_size, num_padded, num_blocks,
                      HAS_SLOT: tl.constexpr, NUM_EXPERTS_PAD: tl.constexpr,
                      CHUNK: tl.constexpr, PAD_COLS: tl.constexpr):
    slot = tl.program_id(0)
    sorted_ids_ptr += slot.to(tl.int64) * num_padded
    expert_ids_ptr += slot.to(tl.int64) * num_blocks
    experts = tl.arange(0, NUM_EXPERTS_PAD)

    # 1. per-expert counts
    counts = tl.zeros((NUM_EXPERTS_PAD,), dtype=tl.int32)
    for c in range(0, tl.cdiv(num_pairs, CHUNK)):
        _, _, one_hot = _chunk_one_hot(c, topk_ids_ptr, token_slot_ptr, slot, num_pairs, top_k,
                                       experts, HAS_SLOT, CHUNK)
        counts += tl.sum(one_hot, axis=0)

    padded = (counts + block_size - 1) // block_size * block_size
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(total_ptr + slot, total)

    # 2. scatter; ``next_pos[e]`` is where expert e's next pair goes
    next_pos = starts
    for c in range(0, tl.cdiv(num_pairs, CHUNK)):
        pair, e, one_hot = _chunk_one_hot(c, topk_ids_ptr, token_slot_ptr, slot, num_pairs,
                                          top_k, experts, HAS_SLOT, CHUNK)
        # pairs of the same expert earlier in this chunk
        before = tl.cumsum(one_hot, axis=0) - one_hot
        pos = tl.sum(one_hot * (before + next_pos[None, :]), axis=1)
        tl.store(sorted_ids_ptr + pos, pair, mask=e >= 0)
        next_pos += tl.sum(one_hot, axis=0)

    # 3. sentinel in each expert's padding [start[e] + count[e], end[e]),
    # shorter than one block, and in the unused tail [total, num_padded)
    sentinel = tl.full((NUM_EXPERTS_PAD, PAD_COLS), 0, tl.int32) + num_pairs
    for j in range(0, tl.cdiv(block_size, PAD_COLS)):
        pos = (starts + counts)[:, None] + j * PAD_COLS + tl.arange(0, PAD_COLS)[None, :]
        tl.store(sorted_ids_ptr + pos, sentinel, mask=pos < ends[:, None])
    for c in range(0, tl.cdiv(num_padded - total, CHUNK)):
        pos = total + c * CHUNK + tl.arange(0, CHUNK)
        tl.store(sorted_ids_ptr + pos, tl.full((CHUNK,), 0, tl.int32) + num_pairs,
                 mask=pos < num_padded)
    # a block's expert is the number of expert runs that end at or before it
    for c in range(0, tl.cdiv(num_blocks, CHUNK)):
        block = c * CHUNK + tl.arange(0, CHUNK)
        first = block * block_size
        expert = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + block, tl.where(first < total, expert, -1),
                 mask=block < num_blocks)


def _launch(topk_ids: torch.Tensor, token_lora_slot: torch.Tensor | None, block_size: int,
            num_experts: int, num_slots: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_pairs = topk_ids.numel()
    device = topk_ids.device
    P = max_padded_pairs(num_pairs, num_experts, block_size)
    sorted_ids = torch.empty((num_slots, P), dtype=torch.int32, device=device)
    expert_ids = torch.empty((num_slots, P // block_size), dtype=torch.int32, device=device)
    total = torch.empty((num_slots,), dtype=torch.int32, device=device)
    experts_pad = triton.next_power_of_2(max(num_experts, 1))
    chunk = min(1024, max(16, _TILE_ELEMENTS // experts_pad))
    pad_cols = min(triton.next_power_of_2(block_size), max(16, _TILE_ELEMENTS // experts_pad))
    _moe_align_kernel[(num_slots,)](
        topk_ids.contiguous(), token_lora_slot, sorted_ids, expert_ids, total,
        num_pairs, topk_ids.shape[1], block_size, P, P // block_size,
        HAS_SLOT=token_lora_slot is not None, NUM_EXPERTS_PAD=experts_pad, CHUNK=chunk,
        PAD_COLS=pad_cols,
        # one program per slot does all the work: give it the most threads
        num_warps=8)
    return sorted_ids, expert_ids, total


def moe_align_block_size_triton(topk_ids: torch.Tensor, block_size: int, num_experts: int
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same outputs as ``moe_align_block_size_torch`` (without ``pair_mask``)."""
    sorted_ids, expert_ids, total = _launch(topk_ids, None, block_size, num_experts, 1)
    return sorted_ids[0], expert_ids[0], total


def moe_lora_align_block_size_triton(topk_ids: torch.Tensor, token_lora_slot: torch.Tensor,
                                     block_size: int, num_experts: int, max_loras: int
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same outputs as ``moe_lora_align_block_size_torch``."""
    return _launch(topk_ids, token_lora_slot.contiguous(), block_size, num_experts, max_loras)
