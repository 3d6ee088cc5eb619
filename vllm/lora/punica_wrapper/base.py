"""The punica wrapper: one object per model that knows this step's token ->
adapter-slot mapping and adds LoRA deltas for every LoRA layer.

``add_lora_linear`` serves the dense layers; ``add_lora_w13`` /
``add_lora_w2`` serve the routed experts and are called from inside each
experts implementation's ``apply()``. Subclasses bind the ops: torch
(reference, CPU) and Triton (GPU).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from vllm.lora.lora_context import MoELoRAContext, ShrinkCombine
from vllm.lora.token_mapping import LoRATokenMapping


class PunicaWrapperBase(ABC):
    def __init__(self, max_loras: int, device: torch.device, max_num_tokens: int = 0):
        self.max_loras = max_loras
        self.device = device
        self.mapping: LoRATokenMapping | None = None
        # host copy of the slots used this step, to skip untouched layers
        self.active_slots: frozenset[int] = frozenset()
        # While capturing a CUDA graph every LoRA layer must record its
        # kernels, whatever adapters happen to be loaded.
        self.all_layers_active = False
        # The mapping lives in fixed buffers so a captured graph reads the
        # current step's mapping at replay.
        self._slots = torch.empty(max_num_tokens, dtype=torch.int32, device=device)
        self._sorted = torch.empty(max_num_tokens, dtype=torch.int32, device=device)
        self._start = torch.empty(max_loras + 1, dtype=torch.int32, device=device)

    def update_mapping(self, token_lora_slot: list[int]) -> None:
        n = len(token_lora_slot)
        slots = torch.tensor(token_lora_slot, dtype=torch.int32, device=self.device)
        built = LoRATokenMapping.build(slots, self.max_loras)
        if n > self._slots.shape[0]:
            self._slots = torch.empty(n, dtype=torch.int32, device=self.device)
            self._sorted = torch.empty(n, dtype=torch.int32, device=self.device)
        self._slots[:n].copy_(built.token_lora_slot)
        self._sorted[:n].copy_(built.sorted_token_ids)
        self._start.copy_(built.slot_start)
        self.mapping = LoRATokenMapping(self._slots[:n], self._sorted[:n], self._start,
                                        self.max_loras)
        self.active_slots = frozenset(s for s in token_lora_slot if s >= 0)

    @abstractmethod
    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor],
                        lora_b: list[torch.Tensor], slice_offsets: list[int],
                        combine_shrink: ShrinkCombine | None = None) -> None:
        """y[t, slice s] += x[t] @ A_s[slot(t)].T @ B_s[slot(t)].T for tokens with an
        adapter. ``combine_shrink`` runs on the shrink output before the
        expand (the collective of fully sharded LoRA)."""

    @abstractmethod
    def add_lora_w13(self, ctx: MoELoRAContext, x: torch.Tensor, cache1: torch.Tensor,
                     topk_ids: torch.Tensor) -> Any:
        """cache1[t*k + j, slice s] += x[t] @ A13_s[slot, e].T @ B13_s[slot, e].T with
        e = topk_ids[t, j] (a local expert id; -1 skips). Returns the pair
        grouping, reused by ``add_lora_w2``."""

    @abstractmethod
    def add_lora_w2(self, ctx: MoELoRAContext, cache2: torch.Tensor, cache3: torch.Tensor,
                    topk_weights: torch.Tensor, alignment: Any, mul_routed_weight: bool) -> None:
        """cache3[pair] += cache2[pair] @ A2[slot, e].T @ B2[slot, e].T, times the pair's
        routing weight when ``mul_routed_weight``."""

    def shrink_buffer(self, num_slices: int, rows: int, rank: int) -> torch.Tensor:
        return torch.zeros(num_slices, rows, rank, dtype=torch.float32, device=self.device)
