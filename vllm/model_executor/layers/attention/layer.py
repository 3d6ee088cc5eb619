"""The Attention layer: binds one layer's KV cache to a backend."""
from __future__ import annotations

import torch
from torch import nn

from vllm.model_executor.layers.attention.backend import AttentionBackend, AttentionMetadata


class Attention(nn.Module):
    """Paged causal attention over flattened heads. The model runner binds
    ``kv_cache`` after allocating the cache."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 backend: AttentionBackend, sliding_window: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_size = head_size
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        self.backend = backend
        self.kv_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata, sinks: torch.Tensor | None = None) -> torch.Tensor:
        if self.kv_cache is None:
            raise RuntimeError("attention layer has no KV cache bound")
        T = q.shape[0]
        out = self.backend.forward(q.view(T, self.num_heads, self.head_size),
                                   k.view(T, self.num_kv_heads, self.head_size),
                                   v.view(T, self.num_kv_heads, self.head_size),
                                   self.kv_cache, meta, self.scale, self.sliding_window, sinks)
        return out.reshape(T, self.num_heads * self.head_size)
