"""Reference experts in plain torch: one dense matmul per touched expert.
Runs on any device; the CPU path and the oracle for faster backends.
Quantized subclasses (torch_quantized.py) only change two hooks: how an
expert's weights become dense, and what the base GEMMs read."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm.model_executor.layers.activation import gated_activation
from vllm.model_executor.layers.fused_moe.experts.base import (ExpertWeights, FusedMoEExperts,
                                                               local_expert_ids)


class TorchReferenceExperts(FusedMoEExperts):
    name = "torch"
    priority = 0

    @classmethod
    def supports_lora(cls) -> bool:
        return True

    def expert_weight(self, weights: ExpertWeights, which: str, e: int) -> torch.Tensor:
        """Expert e's dense w13 or w2 (quantized subclasses dequantize here)."""
        return (weights.w13 if which == "w13" else weights.w2)[e]

    def gemm_input(self, x: torch.Tensor, weights: ExpertWeights, which: str) -> torch.Tensor:
        """What the base GEMM reads: ``x`` itself here; W8A8 subclasses round
        it through FP8. LoRA always reads ``x``."""
        return x

    def apply(self, output, hidden_states, weights, topk_weights, topk_ids, *,
              expert_map=None, lora_context=None):
        T, k = topk_ids.shape
        ids = local_expert_ids(topk_ids, expert_map)
        flat = ids.reshape(-1).long()
        token_of_row = torch.arange(T, device=flat.device).repeat_interleave(k)
        act = self.moe.activation
        x = hidden_states
        groups = [(e, (flat == e).nonzero().squeeze(1)) for e in flat.unique().tolist() if e >= 0]

        # GEMM 1: cache1[t*k + j] = x[t] @ w13[e].T for e = ids[t, j]
        xq = self.gemm_input(x, weights, "w13")
        cache1 = x.new_zeros(T * k, self.moe.intermediate_size * 2)
        for e, rows in groups:
            bias = None if weights.w13_bias is None else weights.w13_bias[e]
            w = self.expert_weight(weights, "w13", e).to(x.dtype)
            cache1[rows] = F.linear(xq[token_of_row[rows]], w, bias)
        alignment = self.apply_w13_lora(lora_context, x, cache1, ids)

        cache2 = gated_activation(cache1, act.kind, act.interleaved, act.alpha, act.limit)

        # GEMM 2: cache3[row] = cache2[row] @ w2[e].T
        cache2q = self.gemm_input(cache2, weights, "w2")
        cache3 = x.new_zeros(T * k, self.moe.hidden_size)
        for e, rows in groups:
            bias = None if weights.w2_bias is None else weights.w2_bias[e]
            w = self.expert_weight(weights, "w2", e).to(x.dtype)
            cache3[rows] = F.linear(cache2q[rows], w, bias)
        self.apply_w2_lora(lora_context, cache2, cache3, topk_weights, alignment,
                           mul_routed_weight=False)

        weighted = cache3.view(T, k, self.moe.hidden_size) * \
            topk_weights.to(cache3.dtype).unsqueeze(-1)
        output.copy_(weighted.sum(dim=1))
