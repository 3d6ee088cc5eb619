"""Experts through ``torch._grouped_mm``: tokens sorted by expert, one
grouped GEMM per projection. Fast and simple, but it has no place to add
LoRA deltas between the GEMMs, so it declares ``supports_lora() = False``
and the oracle keeps it out whenever adapters are enabled."""
from __future__ import annotations

import torch

from vllm.model_executor.layers.activation import gated_activation
from vllm.model_executor.layers.fused_moe.experts.base import FusedMoEExperts, local_expert_ids


class GroupedMMExperts(FusedMoEExperts):
    name = "grouped_mm"
    priority = 5

    @classmethod
    def supports_lora(cls) -> bool:
        return False

    @classmethod
    def unsupported_reason(cls, moe):
        reason = super().unsupported_reason(moe)
        if reason is not None:
            return reason
        if not hasattr(torch, "_grouped_mm"):
            return "this torch has no _grouped_mm"
        if moe.device == "cuda":
            if moe.dtype != torch.bfloat16:
                return "bfloat16 only on CUDA"
            major, _ = torch.cuda.get_device_capability()
            if major < 9:
                return "needs compute capability 9.0+"
            if (moe.hidden_size * 2) % 16 or (moe.intermediate_size * 2) % 16:
                return "GEMM dims must be 16-byte aligned"
        return None

    def apply(self, output, hidden_states, weights, topk_weights, topk_ids, *,
              expert_map=None, lora_context=None):
        if lora_context is not None:
            raise RuntimeError("grouped_mm experts cannot apply LoRA")
        T, k = topk_ids.shape
        E = self.moe.num_local_experts
        flat = local_expert_ids(topk_ids, expert_map).reshape(-1).long()
        order = torch.sort(torch.where(flat < 0, E, flat), stable=True).indices
        counts = torch.bincount(flat[flat >= 0], minlength=E)
        order = order[:int(counts.sum())]
        experts = flat[order]
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        tokens = order // k
        act = self.moe.activation
        cache1 = torch._grouped_mm(hidden_states[tokens], weights.w13.transpose(1, 2), offs=offsets)
        if weights.w13_bias is not None:
            cache1 = cache1 + weights.w13_bias[experts]
        cache2 = gated_activation(cache1, act.kind, act.interleaved, act.alpha, act.limit)
        cache3 = torch._grouped_mm(cache2, weights.w2.transpose(1, 2), offs=offsets)
        if weights.w2_bias is not None:
            cache3 = cache3 + weights.w2_bias[experts]
        cache3 = cache3 * topk_weights.reshape(-1)[order].unsqueeze(1).to(cache3.dtype)
        output.zero_()
        output.index_add_(0, tokens, cache3)
