"""Static description of one MoE layer, shared by the layer, its quant
method and the experts implementation."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MoEActivation:
    """The gated activation between the two expert GEMMs, and how gate and
    up rows are laid out in w13 (a property of the checkpoint format, not of
    the architecture name): ``interleaved`` alternates gate/up rows (GPT-OSS),
    otherwise rows ``[0, I)`` are gate and ``[I, 2I)`` up."""
    kind: str = "silu"            # "silu", "gelu", or "swigluoai"
    interleaved: bool = False
    alpha: float = 1.702          # swigluoai only
    limit: float | None = 7.0     # swigluoai only


@dataclass(frozen=True)
class FusedMoEConfig:
    num_experts: int              # global expert count
    num_local_experts: int        # experts held by this rank
    top_k: int
    hidden_size: int
    intermediate_size: int        # per tensor-parallel partition
    activation: MoEActivation
    has_bias: bool
    dtype: torch.dtype
    device: str
    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    quant_scheme: str = "unquantized"
    quant_group_size: int = 0     # grouped weight quantization along K (0: none)
