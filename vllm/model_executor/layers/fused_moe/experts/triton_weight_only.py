"""4-bit weight-only experts (INT4 W4A16, NVFP4, MXFP4) through Triton
grouped GEMMs that dequantize the packed weights tile by tile against the
unquantized activations. Activations are never quantized, so LoRA sees
exactly what the base GEMMs see."""
from __future__ import annotations

import torch

from vllm.model_executor.layers.activation import gated_activation
from vllm.model_executor.layers.fused_moe.experts.base import FusedMoEExperts, local_expert_ids
from vllm.model_executor.layers.fused_moe.moe_align import moe_align_block_size
from vllm.triton_utils import has_triton


class TritonWeightOnlyExperts(FusedMoEExperts):
    name = "triton"
    priority = 10
    supports_cuda_graphs = True
    quant_schemes = ("int4", "nvfp4", "mxfp4")

    @classmethod
    def supports_lora(cls) -> bool:
        return True

    @classmethod
    def unsupported_reason(cls, moe):
        if moe.quant_scheme not in cls.quant_schemes:
            return f"runs {', '.join(cls.quant_schemes)} experts only"
        if moe.device != "cuda":
            return "needs a CUDA device"
        if not has_triton():
            return "triton is not installed"
        return None

    def apply(self, output, hidden_states, weights, topk_weights, topk_ids, *,
              expert_map=None, lora_context=None):
        from vllm.model_executor.layers.fused_moe.kernels.fused_moe_gemm import moe_block_size
        from vllm.model_executor.layers.fused_moe.kernels.fused_moe_weight_only import (
            invoke_fused_moe_weight_only_gemm)
        quant = weights.quant
        T, k = topk_ids.shape
        E = self.moe.num_local_experts
        act = self.moe.activation
        x = hidden_states

        ids = local_expert_ids(topk_ids, expert_map)
        sorted_pair_ids, expert_ids, num_pairs_post_padded = moe_align_block_size(
            ids, moe_block_size(T * k, E), E)
        aligned = dict(sorted_pair_ids=sorted_pair_ids, expert_ids=expert_ids,
                       num_pairs_post_padded=num_pairs_post_padded, top_k=k,
                       weight_format=quant.format, group_size=quant.group_size)

        cache1 = x.new_empty(T * k, 2 * self.moe.intermediate_size)
        invoke_fused_moe_weight_only_gemm(x, weights.w13, quant.w13_scale, cache1,
                                          gather_rows=True, bias=weights.w13_bias,
                                          channel_scale=quant.w13_channel_scale, **aligned)
        alignment = self.apply_w13_lora(lora_context, x, cache1, ids)

        cache2 = gated_activation(cache1, act.kind, act.interleaved, act.alpha, act.limit)

        if expert_map is None:
            cache3 = x.new_empty(T * k, self.moe.hidden_size)
        else:
            cache3 = x.new_zeros(T * k, self.moe.hidden_size)
        invoke_fused_moe_weight_only_gemm(cache2, weights.w2, quant.w2_scale, cache3,
                                          gather_rows=False, bias=weights.w2_bias,
                                          channel_scale=quant.w2_channel_scale,
                                          topk_weights=topk_weights, **aligned)
        self.apply_w2_lora(lora_context, cache2, cache3, topk_weights, alignment,
                           mul_routed_weight=True)

        torch.sum(cache3.view(T, k, self.moe.hidden_size), dim=1, out=output)
