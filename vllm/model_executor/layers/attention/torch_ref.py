"""Reference attention in plain torch: gathers each sequence's keys from the
paged cache and runs masked softmax attention. The CPU path, and the oracle
the Triton backend is tested against."""
from __future__ import annotations

import torch

from vllm.model_executor.layers.attention.backend import (AttentionBackend, AttentionMetadata,
                                                          write_kv_cache)


def gather_sequence_kv(kv_cache: torch.Tensor, block_table: torch.Tensor,
                       seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    block_size = kv_cache.shape[2]
    blocks = block_table[:-(-seq_len // block_size)].long()
    keys = kv_cache[0, blocks].flatten(0, 1)[:seq_len]
    values = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
    return keys, values


def reference_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        scale: float, sliding_window: int | None,
                        sinks: torch.Tensor | None) -> torch.Tensor:
    """Causal attention of the last ``n = len(q)`` positions of a sequence of
    ``len(keys)`` tokens. q [n, Hq, D], keys/values [L, Hkv, D]."""
    n, num_heads, _ = q.shape
    L, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, keys.to(q.dtype)) * scale
    q_pos = torch.arange(L - n, L, device=q.device)[:, None]
    k_pos = torch.arange(L, device=q.device)[None, :]
    visible = k_pos <= q_pos
    if sliding_window is not None:
        visible &= (q_pos - k_pos) < sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(num_heads, 1, 1).expand(num_heads, n, 1)
        scores = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    return torch.einsum("hqk,khd->qhd", probs, values.to(q.dtype))


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale,
                sliding_window=None, sinks=None):
        write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        starts = meta.query_start_loc_cpu
        for i in range(meta.num_seqs):
            lo, hi = starts[i], starts[i + 1]
            if hi == lo:
                continue
            keys, values = gather_sequence_kv(kv_cache, meta.block_tables[i], meta.seq_lens_cpu[i])
            out[lo:hi] = reference_attention(q[lo:hi], keys, values, scale, sliding_window, sinks)
        return out
