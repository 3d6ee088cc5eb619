"""The punica wrapper: one object per model that knows this step's token ->
adapter-slot mapping and adds LoRA deltas for every LoRA layer.

``add_lora_linear`` serves the dense layers; ``add_lora_w13`` /
``add_lora_w2`` serve the routed experts and are called from inside each
experts implementation's ``apply()``. Subclasses bind the ops: torch
(reference, CPU) and Triton (GPU).
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import Any

import torch

from vllm.lora.lora_context import MoELoRAContext, ShrinkCombine
from vllm.lora.token_mapping import LoRATokenMapping


class LayerSelection(enum.Enum):
    """Which LoRA layers run their kernels. STEP: those an adapter of this
    step touches (eager steps). SLOTS: those any adapter in a slot touches
    (CUDA graph capture: the graph stays right while the slots hold the same
    adapters' layers). ALL: every LoRA layer (compiling before capture)."""
    STEP = "step"
    SLOTS = "slots"
    ALL = "all"


class PunicaWrapperBase(ABC):
    def __init__(self, max_loras: int, device: torch.device, max_num_tokens: int = 0):
        self.max_loras = max_loras
        self.device = device
        self.mapping: LoRATokenMapping | None = None
        # host copy of the slots used this step, to skip untouched layers
        self.active_slots: frozenset[int] = frozenset()
        self.layer_selection = LayerSelection.STEP
        # The mapping lives in one fixed buffer ([slot_start | token slots |
        # sorted token ids], each token part ``capacity`` long) so that a
        # captured graph reads the current step's mapping at replay, and a
        # step's mapping reaches the device in one copy from pinned memory.
        self._pin = torch.device(device).type == "cuda"
        self._allocate(max(max_num_tokens, 1))

    def _allocate(self, capacity: int) -> None:
        self._capacity = capacity
        self._packed = torch.empty(self.max_loras + 1 + 2 * capacity, dtype=torch.int32,
                                   device=self.device)

    def update_mapping(self, token_lora_slot: list[int]) -> None:
        self.active_slots = frozenset(s for s in token_lora_slot if s >= 0)
        if not self.active_slots and self.layer_selection is LayerSelection.STEP:
            return  # no layer reads the mapping this step: no device work at all
        n, L = len(token_lora_slot), self.max_loras + 1
        if n > self._capacity:
            self._allocate(n)
        M = self._capacity
        # built on the host (a few tiny ops) so the step issues one async copy
        built = LoRATokenMapping.build(torch.tensor(token_lora_slot, dtype=torch.int32),
                                       self.max_loras)
        host = torch.empty(L + M + n, dtype=torch.int32, pin_memory=self._pin)
        host[:L] = built.slot_start
        host[L:L + n] = built.token_lora_slot
        host[L + M:] = built.sorted_token_ids
        self._packed[:L + M + n].copy_(host, non_blocking=True)
        self.mapping = LoRATokenMapping(self._packed[L:L + n], self._packed[L + M:L + M + n],
                                        self._packed[:L], self.max_loras)

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

    def moe_lora_w13_in_gemm(self, ctx: MoELoRAContext, x: torch.Tensor,
                             topk_ids: torch.Tensor) -> tuple[Any, Any] | None:
        """For experts whose GEMMs add LoRA themselves: (w13 operands for GEMM 1,
        state for ``moe_lora_w2_in_gemm``), or None when this step's LoRA must
        go through ``add_lora_w13`` / ``add_lora_w2``."""
        return None

    def moe_lora_w2_shrink_in_activation(self, ctx: MoELoRAContext, state: Any,
                                         num_pairs: int) -> Any:
        """After ``moe_lora_w13_in_gemm``: the w2 shrink for the gated
        activation to compute on the rows it writes (a ``MoELoRAPairShrink``),
        or None when the shrink runs on its own."""
        return None

    def moe_lora_w2_in_gemm(self, ctx: MoELoRAContext, cache2: torch.Tensor, state: Any,
                            activation_shrink: Any = None) -> Any:
        """The w2 operands for GEMM 2, after ``moe_lora_w13_in_gemm`` (and the
        activation, given ``moe_lora_w2_shrink_in_activation``'s payload)."""
        raise NotImplementedError(f"{type(self).__name__} has no in-GEMM MoE LoRA")

    def shrink_buffer(self, num_slices: int, rows: int, rank: int) -> torch.Tensor:
        return torch.zeros(num_slices, rows, rank, dtype=torch.float32, device=self.device)
