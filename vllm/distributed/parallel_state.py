"""Process groups for tensor and expert parallelism, passed explicitly.

Layers receive a ``ParallelContext`` at construction instead of reading a
global registry. A single-process engine uses ``ParallelContext.single()``,
whose collectives are no-ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DeviceGroup:
    """The ranks that cooperate along one parallel dimension."""
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast_object(self, obj: object | None = None, src: int = 0) -> object:
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]


@dataclass
class ParallelContext:
    """Where this process sits: its tensor-parallel group and whether MoE
    layers split experts (expert parallel) across that group instead of
    splitting each expert's intermediate dimension."""
    tp: DeviceGroup
    enable_expert_parallel: bool = False
    expert_placement_strategy: str = "linear"

    @staticmethod
    def single() -> "ParallelContext":
        return ParallelContext(tp=DeviceGroup())

    @property
    def moe_tp_size(self) -> int:
        return 1 if self.enable_expert_parallel else self.tp.world_size

    @property
    def moe_tp_rank(self) -> int:
        return 0 if self.enable_expert_parallel else self.tp.rank

    @property
    def ep_size(self) -> int:
        return self.tp.world_size if self.enable_expert_parallel else 1

    @property
    def ep_rank(self) -> int:
        return self.tp.rank if self.enable_expert_parallel else 0
