"""4-bit weight-only experts (INT4 W4A16, NVFP4, MXFP4) through Triton
grouped GEMMs that dequantize the packed weights tile by tile against the
unquantized activations. Activations are never quantized, so LoRA sees
exactly what the base GEMMs see."""
from __future__ import annotations

from vllm.model_executor.layers.fused_moe.experts.triton import TritonGroupedExperts


class TritonWeightOnlyExperts(TritonGroupedExperts):
    name = "triton"
    quant_schemes = ("int4", "nvfp4", "mxfp4")

    @classmethod
    def unsupported_reason(cls, moe):
        from vllm.model_executor.layers.fused_moe.kernels.fused_moe_weight_only import (
            kernel_supports_group)
        reason = super().unsupported_reason(moe)
        if reason is None and not kernel_supports_group(moe.quant_group_size):
            reason = f"needs power-of-two groups >= 16, not {moe.quant_group_size}"
        return reason

    def gemm(self, a, weights, which, out, aligned, gather_rows, topk_weights=None, lora=None):
        from vllm.model_executor.layers.fused_moe.kernels.fused_moe_weight_only import (
            invoke_fused_moe_weight_only_gemm)
        quant = weights.quant
        w13 = which == "w13"
        invoke_fused_moe_weight_only_gemm(
            a, weights.w13 if w13 else weights.w2, quant.w13_scale if w13 else quant.w2_scale,
            out, weight_format=quant.format, group_size=quant.group_size,
            gather_rows=gather_rows, bias=weights.w13_bias if w13 else weights.w2_bias,
            channel_scale=quant.w13_channel_scale if w13 else quant.w2_channel_scale,
            topk_weights=topk_weights, **aligned)
