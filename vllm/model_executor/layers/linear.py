"""Linear layers with tensor-parallel sharding and per-parameter weight loaders.

Each layer owns a ``quant_method`` that creates its parameters and runs the
matmul, so quantized checkpoints change the method, not the layer. Weight
loaders receive the full on-disk tensor and copy this rank's slice of it
into the right place (a shard of a fused QKV or gate/up parameter).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vllm.distributed.parallel_state import DeviceGroup


class WeightShapeError(ValueError):
    """A checkpoint tensor whose shape does not fit its parameter."""


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        setattr(param, key, value)


def new_param(shape: tuple[int, ...], dtype: torch.dtype, **attrs: Any) -> nn.Parameter:
    """An uninitialised, frozen parameter carrying loader attributes
    (``weight_loader``, ``output_dim``, ...)."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    set_weight_attrs(param, attrs)
    return param


def copy_checked(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise WeightShapeError(f"shape {tuple(loaded.shape)} does not match the expected "
                               f"{tuple(param.shape)}")
    param.data.copy_(loaded)


class LinearMethodBase(ABC):
    """Creates a linear layer's parameters and computes ``x @ W.T (+ b)``."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None: ...

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor: ...

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        return None


class UnquantizedLinearMethod(LinearMethodBase):
    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        layer.register_parameter("weight", new_param(
            (sum(output_sizes), input_size), params_dtype, input_dim=1, output_dim=0,
            weight_loader=layer.weight_loader))

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


class LinearBase(nn.Module):
    """Shared plumbing: partition sizes, the quant method and the bias.

    ``output_sizes`` lists the logical outputs fused into this layer (one for
    a plain linear, [q, k, v] for QKV); ``output_partition_sizes`` are this
    rank's parts of them.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool,
                 params_dtype: torch.dtype, tp: DeviceGroup | None,
                 shard_input: bool, shard_output: bool,
                 quant_method: LinearMethodBase | None = None,
                 output_partition_sizes: list[int] | None = None):
        super().__init__()
        self.tp = tp or DeviceGroup()
        tp_size = self.tp.world_size
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.shard_input = shard_input and tp_size > 1
        self.shard_output = shard_output and tp_size > 1
        for size in ([input_size] if self.shard_input else []):
            if size % tp_size:
                raise ValueError(f"input size {size} is not divisible by tensor parallel size {tp_size}")
        if output_partition_sizes is None:
            if self.shard_output and any(s % tp_size for s in output_sizes):
                raise ValueError(f"output sizes {output_sizes} are not divisible by tensor "
                                 f"parallel size {tp_size}")
            output_partition_sizes = [s // tp_size if self.shard_output else s
                                      for s in output_sizes]
        self.output_partition_sizes = output_partition_sizes
        self.input_size_per_partition = input_size // tp_size if self.shard_input else input_size
        self.output_size_per_partition = sum(output_partition_sizes)
        self.params_dtype = params_dtype
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, self.input_size_per_partition,
                                         self.output_partition_sizes, params_dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size_per_partition, dtype=params_dtype),
                                     requires_grad=False)
            set_weight_attrs(self.bias, {"output_dim": 0, "weight_loader": self.weight_loader})
        else:
            self.register_parameter("bias", None)

    # Where shard `shard_id` of the logical output starts in this rank's
    # partition and how many rows it has, plus where this rank's part starts
    # in the on-disk tensor of that shard.
    def shard_layout(self, shard_id: Any) -> tuple[int, int, int]:
        index = 0 if shard_id is None else self._shard_index(shard_id)
        offset = sum(self.output_partition_sizes[:index])
        size = self.output_partition_sizes[index]
        start = self.tp.rank * size if self.shard_output else 0
        return offset, size, start

    def _shard_index(self, shard_id: Any) -> int:
        return int(shard_id)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor,
                      shard_id: Any = None) -> None:
        output_dim = getattr(param, "output_dim", None)
        input_dim = getattr(param, "input_dim", None)
        if self.shard_input and input_dim is not None:
            size = param.shape[input_dim]
            if loaded.shape[input_dim] != size * self.tp.world_size:
                raise WeightShapeError(f"shape {tuple(loaded.shape)} does not match the expected "
                                       f"{size * self.tp.world_size} columns along dim {input_dim}")
            loaded = loaded.narrow(input_dim, self.tp.rank * size, size)
        if output_dim is None:
            copy_checked(param, loaded)
            return
        offset, size, start = self.shard_layout(shard_id)
        index = 0 if shard_id is None else self._shard_index(shard_id)
        pack = getattr(param, "output_pack", 1)  # logical rows per stored row (block scales)
        offset, size, start = offset // pack, -(-size // pack), start // pack
        full = -(-self.output_sizes[index] // pack)
        if loaded.shape[output_dim] != full:
            raise WeightShapeError(f"shape {tuple(loaded.shape)} does not match the expected "
                                   f"{full} rows along dim {output_dim}")
        loaded = loaded.narrow(output_dim, start, size)
        copy_checked(param.data.narrow(output_dim, offset, size), loaded)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's ``x @ W.T + b`` before any cross-rank reduction."""
        bias = self.bias
        if self.shard_input and bias is not None and self.tp.rank != 0:
            bias = None  # added once before the all-reduce
        return self.quant_method.apply(self, x, bias)

    def reduce(self, y: torch.Tensor) -> torch.Tensor:
        """Sum the partial outputs of an input-sharded layer across ranks."""
        return self.tp.all_reduce(y) if self.shard_input else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.matmul(x))

    def extra_repr(self) -> str:
        return (f"in={self.input_size_per_partition}, out={self.output_partition_sizes}, "
                f"bias={self.bias is not None}")


class ReplicatedLinear(LinearBase):
    """Same full weight on every rank (routers, small gates)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 params_dtype: torch.dtype = torch.float32,
                 quant_method: LinearMethodBase | None = None):
        super().__init__(input_size, [output_size], bias, params_dtype, None,
                         shard_input=False, shard_output=False, quant_method=quant_method)


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel outputs in one matmul (gate_proj + up_proj);
    shard ids are the positions in ``output_sizes``."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 params_dtype: torch.dtype = torch.float32, tp: DeviceGroup | None = None,
                 quant_method: LinearMethodBase | None = None):
        super().__init__(input_size, output_sizes, bias, params_dtype, tp,
                         shard_input=False, shard_output=True, quant_method=quant_method)


class QKVParallelLinear(LinearBase):
    """Fused q/k/v projection split by heads. With fewer KV heads than
    tensor-parallel ranks each KV head is replicated on several ranks."""

    def __init__(self, hidden_size: int, head_size: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, params_dtype: torch.dtype = torch.float32,
                 tp: DeviceGroup | None = None, quant_method: LinearMethodBase | None = None):
        tp = tp or DeviceGroup()
        tp_size = tp.world_size
        if num_heads % tp_size:
            raise ValueError(f"{num_heads} attention heads are not divisible by tensor "
                             f"parallel size {tp_size}")
        if num_kv_heads >= tp_size and num_kv_heads % tp_size:
            raise ValueError(f"{num_kv_heads} KV heads are not divisible by tensor parallel size {tp_size}")
        if num_kv_heads < tp_size and tp_size % num_kv_heads:
            raise ValueError(f"tensor parallel size {tp_size} is not a multiple of {num_kv_heads} KV heads")
        self.head_size = head_size
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.kv_replicas = max(1, tp_size // num_kv_heads)
        partitions = [self.num_heads * head_size, self.num_kv_heads * head_size,
                      self.num_kv_heads * head_size]
        super().__init__(hidden_size, [num_heads * head_size, num_kv_heads * head_size,
                                       num_kv_heads * head_size],
                         bias, params_dtype, tp, shard_input=False, shard_output=True,
                         quant_method=quant_method, output_partition_sizes=partitions)

    _SHARDS = {"q": 0, "k": 1, "v": 2}

    def _shard_index(self, shard_id: Any) -> int:
        return self._SHARDS[shard_id] if isinstance(shard_id, str) else int(shard_id)

    def shard_layout(self, shard_id: Any) -> tuple[int, int, int]:
        index = self._shard_index(shard_id)
        offset = sum(self.output_partition_sizes[:index])
        size = self.output_partition_sizes[index]
        head_rank = self.tp.rank if index == 0 else self.tp.rank // self.kv_replicas
        start = head_rank * size if self.shard_output else 0
        return offset, size, start


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 params_dtype: torch.dtype = torch.float32, tp: DeviceGroup | None = None,
                 quant_method: LinearMethodBase | None = None):
        super().__init__(input_size, [output_size], bias, params_dtype, tp,
                         shard_input=True, shard_output=False, quant_method=quant_method)
