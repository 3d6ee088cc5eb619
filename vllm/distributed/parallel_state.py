"""Process groups for tensor and expert parallelism, passed explicitly.

Layers receive a ``ParallelContext`` at construction instead of reading a
global registry. A single-process engine uses ``ParallelContext.single()``,
whose collectives are no-ops.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DeviceGroup:
    """The ranks that cooperate along one parallel dimension. ``group``
    carries tensors (NCCL on GPUs, gloo on CPUs); ``cpu_group`` (gloo)
    carries Python objects such as each step's inputs."""
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None
    cpu_group: dist.ProcessGroup | None = None

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

    def all_reduce_min(self, value: int) -> int:
        """The smallest of every rank's ``value`` (over the CPU group)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def broadcast_object(self, obj: object | None = None, src: int = 0) -> object:
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.cpu_group)
        return box[0]


def init_distributed(rank: int, world_size: int, device: str, init_method: str,
                     device_index: int | None = None, timeout_s: float = 1800) -> DeviceGroup:
    """Join the process group of an engine's workers; returns the
    tensor-parallel group (all ranks). ``device_index`` is the CUDA device
    this process uses (default: its rank; 0 where a scheduler such as Ray
    shows each process only its own GPU)."""
    from datetime import timedelta
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank if device_index is None else device_index)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    return DeviceGroup(rank, world_size, dist.group.WORLD, cpu_group)


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
    def is_driver(self) -> bool:
        return self.tp.rank == 0

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


def destroy_distributed(timeout_s: float = 60.0) -> None:
    """Tear down this process's groups (every rank calls it together). A
    teardown that does not finish in ``timeout_s`` raises instead of hanging
    the caller; the groups then stay and no new engine can start here."""
    if not dist.is_initialized():
        return
    done = threading.Event()

    def destroy() -> None:
        dist.destroy_process_group()
        done.set()

    threading.Thread(target=destroy, name="vllm-destroy-groups", daemon=True).start()
    if not done.wait(timeout_s):
        raise RuntimeError(f"tearing down the process groups did not finish in {timeout_s:.0f} s")


def abort_distributed() -> None:
    """Drop this process's groups without waiting for any peer: the way out
    after a rank died, when a collective teardown would wait for it forever."""
    if dist.is_initialized():
        dist.distributed_c10d._abort_process_group()
