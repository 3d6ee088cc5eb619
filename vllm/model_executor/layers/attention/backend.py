"""The attention backend interface and the per-step metadata it reads.

All backends see one flattened batch: the new tokens of every scheduled
sequence back to back (a prefill chunk, or one token for a decode). Their
keys and values are first written into the paged KV cache at
``slot_mapping``; then each query attends causally to its sequence's cached
keys, read through ``block_tables``.

KV cache layout per layer: ``[2, num_blocks, block_size, num_kv_heads, head_size]``
(index 0 keys, 1 values); slot ``s`` is block ``s // block_size``, row
``s % block_size``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    num_seqs: int
    num_tokens: int
    query_start_loc: torch.Tensor  # [S + 1] int32: start of each sequence's queries
    seq_lens: torch.Tensor         # [S] int32: cached + new tokens per sequence
    block_tables: torch.Tensor     # [S, max_blocks] int32
    slot_mapping: torch.Tensor     # [T] int64: cache slot of each new token
    max_query_len: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' keys and values ([T, kv_heads, head]) in their slots."""
    _, num_blocks, block_size, heads, head = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, heads, head)
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


class AttentionBackend(ABC):
    """Computes paged causal attention for one layer."""
    name: str = ""
    # Whether forward() reads only device tensors and shape-level host values
    # (so a captured CUDA graph stays valid when the metadata changes).
    supports_cuda_graphs: bool = False

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None,
                sinks: torch.Tensor | None = None) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> output [T, Hq, D].

        ``sliding_window`` w lets a query at position p see keys at positions
        p - w + 1 .. p. ``sinks`` [Hq] are per-head logits that join each
        softmax denominator without contributing a value (GPT-OSS).
        """
