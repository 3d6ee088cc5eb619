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

from vllm.model_executor.layers.fused_moe.experts.triton import TritonGroupedExperts
from vllm.model_executor.quantization.fp8_activation import quantize_fp8_act


class TritonFp8Experts(TritonGroupedExperts):
    name = "triton"
    quant_schemes = ("fp8",)

    @classmethod
    def unsupported_reason(cls, moe):
        reason = super().unsupported_reason(moe)
        if reason is None and torch.cuda.get_device_capability() < (8, 9):
            return "FP8 matmuls need compute capability 8.9+"
        return reason

    def apply(self, output, hidden_states, weights, topk_weights, topk_ids, **kwargs):
        if weights.quant.act is None:
            raise RuntimeError("triton FP8 experts run W8A8 schemes only")
        super().apply(output, hidden_states, weights, topk_weights, topk_ids, **kwargs)

    def gemm(self, a, weights, which, out, aligned, gather_rows, topk_weights=None, lora=None):
        from vllm.model_executor.layers.fused_moe.kernels.fused_moe_w8a8 import (
            invoke_fused_moe_w8a8_gemm)
        quant = weights.quant
        w13 = which == "w13"
        # the FP8 copy feeds this GEMM only; the caller's LoRA reads `a` itself
        aq, a_scale = quantize_fp8_act(a, quant.act,
                                       quant.w13_input_scale if w13 else quant.w2_input_scale)
        w = weights.w13 if w13 else weights.w2
        if not aq.is_cuda:  # Triton's interpreter has no FP8: the same values in float32
            aq, w = aq.float(), w.float()
        invoke_fused_moe_w8a8_gemm(aq, a_scale, w, quant.w13_scale if w13 else quant.w2_scale,
                                   out, gather_rows=gather_rows, group_k=quant.block_k,
                                   bias=weights.w13_bias if w13 else weights.w2_bias,
                                   topk_weights=topk_weights, **aligned)
