"""Dispatch and combine around the experts: what happens to tokens before
and after the expert GEMMs.

Tensor-parallel attention leaves every rank holding every token of the step
(and the driver broadcasts each token's adapter slot to all ranks), so
dispatch moves nothing: each rank runs its share of the work for all tokens
— its experts under expert parallelism, its slice of every expert's
intermediate dimension otherwise — and combine all-reduces the partial sums.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from vllm.distributed.parallel_state import DeviceGroup


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


class ReplicatedTokensPrepareAndFinalize(PrepareAndFinalize):
    def __init__(self, group: DeviceGroup | None = None):
        self.group = group or DeviceGroup()

    def prepare(self, hidden_states, topk_weights, topk_ids):
        return PreparedTokens(hidden_states, topk_weights, topk_ids)

    def finalize(self, output):
        return self.group.all_reduce(output)
