"""Dispatch and combine around the experts: what happens to tokens before
and after the expert GEMMs.

Without expert parallelism every rank already holds every token, so
prepare and finalize pass tensors through (the layer all-reduces partial
sums when experts or their intermediate dimension are split)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class PreparedTokens:
    hidden_states: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor


class PrepareAndFinalize(ABC):
    @abstractmethod
    def prepare(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> PreparedTokens: ...

    @abstractmethod
    def finalize(self, output: torch.Tensor) -> torch.Tensor: ...


class NoEPPrepareAndFinalize(PrepareAndFinalize):
    def prepare(self, hidden_states, topk_weights, topk_ids):
        return PreparedTokens(hidden_states, topk_weights, topk_ids)

    def finalize(self, output):
        return output
