"""Paged causal attention in Triton: one kernel for a whole mixed batch.

Every program owns one tile of query rows of one sequence and one KV head.
The rows of a tile are (token, query head) pairs: the ``G = Hq // Hkv`` query
heads that share a KV head are packed next to each other, so a tile holds
``BLOCK_M // G`` consecutive tokens of one sequence. Decodes (one token) thus
still fill ``G`` rows per tile, and each key/value tile loaded from the cache
serves the whole head group.

Query tiles are numbered without a host round trip: sequence ``i`` owns the
tiles ``first(i) .. first(i + 1) - 1`` with
``first(i) = query_start_loc[i] // BLOCK_Q + i`` (``BLOCK_Q`` tokens a tile).
That gives every sequence at least ``cdiv(n_i, BLOCK_Q)`` tiles, the launch
needs only ``T // BLOCK_Q + num_seqs`` programs (host integers fixed for a
captured CUDA graph), and a program finds its sequence by binary search over
``query_start_loc`` on the device. Tiles past a sequence's queries exit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm.model_executor.layers.attention.backend import (AttentionBackend, AttentionMetadata,
                                                          write_kv_cache)

_LOG2E = tl.constexpr(1.4426950408889634)
# tl.dot needs every dimension to be at least 16 on NVIDIA GPUs.
_MIN_DOT = 16


@triton.jit
def _paged_attention_kernel(
    q_ptr, key_cache_ptr, value_cache_ptr, out_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr, sinks_ptr,
    num_seqs, qk_scale_log2, sliding_window,
    stride_q_tok, stride_q_head,
    stride_o_tok, stride_o_head,
    stride_c_block, stride_c_row, stride_c_head,
    stride_bt_seq,
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)

    # Last sequence whose first tile is <= this tile (first(0) = 0, so seq >= 0).
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        mid_first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        go_right = mid_first <= tile
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(go_right, hi, mid)
    seq = lo - 1

    q_start = tl.load(query_start_loc_ptr + seq)
    num_queries = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first_token = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if first_token >= num_queries:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    # The queries are the last num_queries positions of the sequence.
    context_len = seq_len - num_queries

    rows = tl.arange(0, BLOCK_M)
    token = first_token + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (token < num_queries)
    # Invalid rows get position -1 so they see no key and cannot raise the tile's key range.
    q_pos = tl.where(row_valid, context_len + token, -1)

    dims = tl.arange(0, HEAD_PAD)
    dim_valid = dims < HEAD_SIZE
    q_offsets = (q_start + token).to(tl.int64) * stride_q_tok + head * stride_q_head
    q = tl.load(q_ptr + q_offsets[:, None] + dims[None, :],
                mask=row_valid[:, None] & dim_valid[None, :], other=0.0)

    if HAS_SINKS:
        # The oracle casts sinks to the score dtype (q's) before the softmax.
        sink = tl.load(sinks_ptr + head, mask=row_valid, other=0.0).to(q.dtype).to(tl.float32)
        m_i = sink * _LOG2E
        l_i = tl.where(row_valid, 1.0, 0.0)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)

    last_pos = context_len + tl.minimum(first_token + BLOCK_Q, num_queries) - 1
    kv_end = last_pos + 1
    kv_begin = 0
    if HAS_WINDOW:
        kv_begin = tl.maximum(context_len + first_token - sliding_window + 1, 0)

    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    head_offset = kv_head * stride_c_head
    for kv_start in range(kv_begin, kv_end, BLOCK_N):
        k_pos = kv_start + tl.arange(0, BLOCK_N)
        k_valid = k_pos < kv_end
        # Keys are gathered one row at a time through the block table, so a
        # tile may span several cache blocks whatever the block size.
        block = tl.load(block_table + k_pos // BLOCK_SIZE, mask=k_valid, other=0)
        kv_offsets = (block.to(tl.int64) * stride_c_block
                      + (k_pos % BLOCK_SIZE) * stride_c_row + head_offset)
        k = tl.load(key_cache_ptr + kv_offsets[None, :] + dims[:, None],
                    mask=dim_valid[:, None] & k_valid[None, :], other=0.0)
        scores = tl.dot(q, k.to(q.dtype), input_precision="ieee") * qk_scale_log2

        visible = k_pos[None, :] <= q_pos[:, None]
        if HAS_WINDOW:
            visible &= (q_pos[:, None] - k_pos[None, :]) < sliding_window
        scores = tl.where(visible, scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # A row may see nothing in this tile and nothing before it; keep exp2 finite.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)

        v = tl.load(value_cache_ptr + kv_offsets[:, None] + dims[None, :],
                    mask=k_valid[:, None] & dim_valid[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
        m_i = m_new

    out = acc / tl.where(row_valid, l_i, 1.0)[:, None]
    o_offsets = (q_start + token).to(tl.int64) * stride_o_tok + head * stride_o_head
    tl.store(out_ptr + o_offsets[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None] & dim_valid[None, :])


class TritonAttentionBackend(AttentionBackend):
    """Paged attention for mixed prefill/decode batches with one Triton launch.

    ``block_m``/``block_n`` override the tile heuristics (query rows and keys
    per tile); both must be powers of two of at least 16.
    """
    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, block_m: int | None = None, block_n: int | None = None):
        self.block_m = block_m
        self.block_n = block_n

    def _tile_shape(self, max_query_len: int, group: int, head_pad: int) -> tuple[int, int]:
        if self.block_m is not None:
            block_m = self.block_m
        else:
            # Decode-only batches need just `group` rows; prefills want big tiles.
            cap = 128 if head_pad <= 128 else 64
            block_m = min(cap, max(_MIN_DOT, triton.next_power_of_2(max_query_len * group)))
        # At least one whole head group per tile.
        block_m = max(block_m, triton.next_power_of_2(group))
        block_n = self.block_n if self.block_n is not None else (64 if head_pad <= 128 else 32)
        return block_m, block_n

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None,
                sinks: torch.Tensor | None = None) -> torch.Tensor:
        write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        num_tokens, num_heads, head_size = q.shape
        num_kv_heads = kv_cache.shape[3]
        out = torch.empty((num_tokens, num_heads, head_size), dtype=q.dtype, device=q.device)
        if num_tokens == 0 or meta.num_seqs == 0:
            return out
        if q.stride(-1) != 1:
            q = q.contiguous()
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        if key_cache.stride(-1) != 1:
            raise ValueError("the KV cache's head dimension must be contiguous")

        group = num_heads // num_kv_heads
        head_pad = max(_MIN_DOT, triton.next_power_of_2(head_size))
        block_m, block_n = self._tile_shape(meta.max_query_len, group, head_pad)
        block_q = block_m // group
        # Enough tiles for any split of num_tokens queries over num_seqs sequences (see module doc).
        grid = (num_tokens // block_q + meta.num_seqs, num_kv_heads)
        _paged_attention_kernel[grid](
            q, key_cache, value_cache, out,
            meta.query_start_loc, meta.seq_lens, meta.block_tables,
            sinks if sinks is not None else q,
            meta.num_seqs, scale * _LOG2E.value, sliding_window or 0,
            q.stride(0), q.stride(1),
            out.stride(0), out.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            meta.block_tables.stride(0),
            HEAD_SIZE=head_size, HEAD_PAD=head_pad,
            GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q,
            BLOCK_N=block_n, BLOCK_SIZE=kv_cache.shape[2],
            HAS_WINDOW=sliding_window is not None, HAS_SINKS=sinks is not None,
            num_warps=4 if block_m * head_pad <= 64 * 128 else 8,
        )
        return out
