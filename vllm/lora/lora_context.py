"""MoELoRAContext: everything an experts implementation needs to add the
adapters' deltas to one MoE layer in one step.

Built by ``FusedMoEWithLoRA.set_mapping`` once per step and passed
explicitly: FusedMoE.forward -> quant method ``apply`` -> FusedMoEKernel ->
``experts.apply(..., lora_context=)``. Steps in which no active adapter
touches the layer get no context at all, so the layer runs as if LoRA were
off.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vllm.lora.punica_wrapper.base import PunicaWrapperBase

# Applied to a shrink output [S, rows, R] before its expand: the collective of
# fully sharded LoRA (all-gather over the rank dim, or all-reduce of partial sums).
ShrinkCombine = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class MoELoRAContext:
    # Stacked adapter factors, one slot per adapter (zero-padded to the max
    # rank; scaling folded into B). w13 has one entry per output slice:
    # [gate, up] for the per-expert (2D) layout, [gate_up] for the fused (3D).
    w13_lora_a: list[torch.Tensor]     # each [L, E, R, H]
    w13_lora_b: list[torch.Tensor]     # each [L, E, N_s, R]
    w2_lora_a: torch.Tensor            # [L, E, R, I]
    w2_lora_b: torch.Tensor            # [L, E, H, R]
    # 1 where the slot's adapter has expert weights for this layer
    adapter_enabled: torch.Tensor      # [L] int32
    max_loras: int
    top_k: int
    w13_num_slices: int
    w13_slice_offsets: list[int]       # first column of each slice in GEMM-1 output rows
    punica: "PunicaWrapperBase"
    # fully sharded LoRA under tensor parallelism: w13's A holds this rank's
    # share of the rank dim (gathered after shrink); w2's B holds this rank's
    # rows of the hidden dim (the shrink is all-reduced first), written from
    # column ``w2_out_offset`` of GEMM-2's output
    w13_shrink_combine: ShrinkCombine | None = None
    w2_shrink_combine: ShrinkCombine | None = None
    w2_out_offset: int = 0

    @property
    def max_rank(self) -> int:
        """The rank as stored in the w2 shrink (w13's A may hold a share)."""
        return self.w2_lora_a.shape[2]

    @property
    def w13_rank(self) -> int:
        return self.w13_lora_a[0].shape[2]
