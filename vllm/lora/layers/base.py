"""The interface every LoRA-wrapped layer implements."""
from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import nn

from vllm.config import LoRAConfig
from vllm.lora.punica_wrapper.base import LayerSelection, PunicaWrapperBase


class BaseLayerWithLoRA(nn.Module):
    """Wraps a base layer; holds ``max_loras`` slots of stacked adapter
    factors and adds the deltas of each token's slot in ``forward``."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.punica: PunicaWrapperBase | None = None
        # slots whose adapter has weights for this layer (host-side, to skip work)
        self.slots_with_weights: set[int] = set()

    @abstractmethod
    def create_lora_weights(self, max_loras: int, config: LoRAConfig,
                            device: torch.device) -> None:
        """Allocate zeroed slot buffers."""

    @abstractmethod
    def set_lora(self, slot: int, weights: Any) -> None:
        """Copy one adapter's (canonical, unsharded) factors into ``slot``,
        taking this rank's part; None means the adapter leaves the layer alone."""

    @abstractmethod
    def reset_lora(self, slot: int) -> None: ...

    def check_lora(self, weights: Any) -> None:
        """Raise LoRAError if ``set_lora`` could not take these weights (run
        when an adapter is loaded, before any slot is touched)."""
        return None

    def set_mapping(self, punica: PunicaWrapperBase) -> None:
        """Called once per step, after the punica wrapper got the step's mapping."""
        self.punica = punica

    def touched_this_step(self) -> bool:
        if self.punica is None:
            return False
        selection = self.punica.layer_selection
        if selection is LayerSelection.ALL:
            return True
        if selection is LayerSelection.SLOTS:
            return bool(self.slots_with_weights)
        return bool(self.punica.active_slots & self.slots_with_weights)


def copy_padded(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy ``src`` into the leading corner of ``dst`` and zero the rest
    (lower ranks are zero-padded up to the slot's rank)."""
    dst.zero_()
    dst[tuple(slice(0, n) for n in src.shape)].copy_(src)


def padded(t: torch.Tensor, rank_dim: int, rank: int) -> torch.Tensor:
    """``t`` zero-padded along ``rank_dim`` to ``rank`` (before a fully
    sharded layer takes its share of the rank dimension)."""
    if t.shape[rank_dim] == rank:
        return t
    shape = list(t.shape)
    shape[rank_dim] = rank
    out = t.new_zeros(shape)
    out.narrow(rank_dim, 0, t.shape[rank_dim]).copy_(t)
    return out


def rank_share(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """This rank's equal share of ``t`` along ``dim``."""
    n = t.shape[dim] // world
    return t.narrow(dim, rank * n, n)
