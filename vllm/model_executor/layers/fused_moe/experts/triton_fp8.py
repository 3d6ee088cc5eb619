"""FP8 W8A8 experts through Triton grouped GEMMs (Hopper / Ada).

Same steps as ``TritonExperts``; each GEMM input is quantized to FP8 first
(per token, per token group for block-scaled weights, or with the static
checkpoint scale) and only the GEMM reads the quantized copy: LoRA reads the
original hidden states and the unquantized activation output. Activation
quantization is plain tensor ops without host syncs, so the whole apply can
be captured in a CUDA graph.
"""
from __future__ import annotations

import torch

from vllm.model_executor.layers.activation import gated_activation
from vllm.model_executor.layers.fused_moe.experts.base import FusedMoEExperts, local_expert_ids
from vllm.model_executor.layers.fused_moe.moe_align import moe_align_block_size
from vllm.model_executor.quantization.fp8_activation import quantize_fp8_act
from vllm.triton_utils import has_triton


class TritonFp8Experts(FusedMoEExperts):
    name = "triton"
    priority = 10
    supports_cuda_graphs = True
    quant_schemes = ("fp8",)

    @classmethod
    def supports_lora(cls) -> bool:
        return True

    @classmethod
    def unsupported_reason(cls, moe):
        if moe.quant_scheme != "fp8":
            return "FP8 W8A8 experts only"
        if moe.device != "cuda" or not torch.cuda.is_available():
            return "needs a CUDA device"
        if not has_triton():
            return "triton is not installed"
        if torch.cuda.get_device_capability() < (8, 9):
            return "FP8 matmuls need compute capability 8.9+"
        return None

    def _operands(self, q: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Triton's interpreter has no FP8: hand it float32 copies of the same values.
        if q.is_cuda:
            return q, w
        return q.float(), w.float()

    def apply(self, output, hidden_states, weights, topk_weights, topk_ids, *,
              expert_map=None, lora_context=None):
        from vllm.model_executor.layers.fused_moe.kernels.fused_moe_gemm import moe_block_size
        from vllm.model_executor.layers.fused_moe.kernels.fused_moe_w8a8 import (
            invoke_fused_moe_w8a8_gemm)
        quant = weights.quant
        if quant.act is None:
            raise RuntimeError("triton FP8 experts run W8A8 schemes only")
        T, k = topk_ids.shape
        E = self.moe.num_local_experts
        act = self.moe.activation
        x = hidden_states

        ids = local_expert_ids(topk_ids, expert_map)
        sorted_pair_ids, expert_ids, num_pairs_post_padded = moe_align_block_size(
            ids, moe_block_size(T * k, E), E)
        aligned = dict(sorted_pair_ids=sorted_pair_ids, expert_ids=expert_ids,
                       num_pairs_post_padded=num_pairs_post_padded, top_k=k,
                       group_k=quant.block_k)

        # GEMM 1 on FP8 x; LoRA on the original x
        xq, xs = quantize_fp8_act(x, quant.act, quant.w13_input_scale)
        a, b = self._operands(xq, weights.w13)
        cache1 = x.new_empty(T * k, 2 * self.moe.intermediate_size)
        invoke_fused_moe_w8a8_gemm(a, xs, b, quant.w13_scale, cache1, gather_rows=True,
                                   bias=weights.w13_bias, **aligned)
        alignment = self.apply_w13_lora(lora_context, x, cache1, ids)

        cache2 = gated_activation(cache1, act.kind, act.interleaved, act.alpha, act.limit)

        # GEMM 2 on FP8 cache2 (routing weights folded in); LoRA on cache2
        cq, cs = quantize_fp8_act(cache2, quant.act, quant.w2_input_scale)
        a, b = self._operands(cq, weights.w2)
        if expert_map is None:
            cache3 = x.new_empty(T * k, self.moe.hidden_size)
        else:
            cache3 = x.new_zeros(T * k, self.moe.hidden_size)
        invoke_fused_moe_w8a8_gemm(a, cs, b, quant.w2_scale, cache3, gather_rows=False,
                                   bias=weights.w2_bias, topk_weights=topk_weights, **aligned)
        self.apply_w2_lora(lora_context, cache2, cache3, topk_weights, alignment,
                           mul_routed_weight=True)

        torch.sum(cache3.view(T, k, self.moe.hidden_size), dim=1, out=output)
