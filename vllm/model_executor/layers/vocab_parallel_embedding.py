"""Token embedding and LM head, split over the vocabulary across ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm.distributed.parallel_state import DeviceGroup
from vllm.model_executor.layers.linear import WeightShapeError, copy_checked


class VocabParallelEmbedding(nn.Module):
    """Rows ``[rank * shard, (rank + 1) * shard)`` of the (padded) vocabulary
    live on each rank; tokens outside the shard embed to zero before the
    all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, params_dtype: torch.dtype,
                 tp: DeviceGroup | None = None):
        super().__init__()
        self.tp = tp or DeviceGroup()
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // self.tp.world_size)
        self.start = self.tp.rank * self.shard_size
        self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden_size, dtype=params_dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        if loaded.dim() != 2 or loaded.shape[0] != self.vocab_size or \
                loaded.shape[1] != param.shape[1]:
            raise WeightShapeError(f"shape {tuple(loaded.shape)} does not match the expected "
                                   f"({self.vocab_size}, {param.shape[1]})")
        rows = loaded[self.start:self.start + self.shard_size]
        param.data.zero_()
        copy_checked(param.data[:rows.shape[0]], rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to vocabulary logits; each rank computes its shard
    and the shards are gathered."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if self.tp.world_size > 1:
            logits = self.tp.all_gather(logits, dim=-1)
        return logits[..., :self.vocab_size]
