"""FusedMoEKernel = PrepareAndFinalize + Experts.

Dispatch/combine and the expert GEMMs are separate objects, so expert
parallelism, quantization schemes and LoRA compose instead of multiplying
into one code path per combination."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vllm.model_executor.layers.fused_moe.experts.base import ExpertWeights, FusedMoEExperts
from vllm.model_executor.layers.fused_moe.prepare_finalize import PrepareAndFinalize

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext


class FusedMoEKernel:
    def __init__(self, prepare_finalize: PrepareAndFinalize, experts: FusedMoEExperts):
        self.prepare_finalize = prepare_finalize
        self.experts = experts

    def forward(self, hidden_states: torch.Tensor, weights: ExpertWeights,
                topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                expert_map: torch.Tensor | None = None,
                lora_context: "MoELoRAContext | None" = None) -> torch.Tensor:
        tokens = self.prepare_finalize.prepare(hidden_states, topk_weights, topk_ids)
        output = torch.empty_like(tokens.hidden_states)
        self.experts.apply(output, tokens.hidden_states, weights, tokens.topk_weights,
                           tokens.topk_ids, expert_map=expert_map, lora_context=lora_context)
        return self.prepare_finalize.finalize(output)
