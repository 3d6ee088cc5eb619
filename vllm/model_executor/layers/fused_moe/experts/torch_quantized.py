"""Reference experts for quantized weights, in plain torch (the CPU path and
the oracle for the Triton classes).

Each expert's weights are dequantized to float (``Fp8ExpertQuant`` /
``PackedExpertQuant`` know how); W8A8 schemes also round each GEMM input
through FP8 exactly as the Triton kernels quantize it. LoRA reads the
unquantized hidden states and the unquantized GEMM-1 activation output,
never the rounded copies the base GEMMs see.
"""
from __future__ import annotations

import torch

from vllm.model_executor.layers.fused_moe.experts.base import ExpertWeights
from vllm.model_executor.layers.fused_moe.experts.torch_ref import TorchReferenceExperts
from vllm.model_executor.quantization.fp8_activation import fake_quantize_fp8_act


class _TorchDequantExperts(TorchReferenceExperts):
    def expert_weight(self, weights: ExpertWeights, which: str, e: int) -> torch.Tensor:
        packed = weights.w13 if which == "w13" else weights.w2
        return weights.quant.dequant(packed, which, e)


class TorchFp8Experts(_TorchDequantExperts):
    """FP8 weights (per-channel or block scales), W8A8 or W8A16."""
    quant_schemes = ("fp8", "fp8_w8a16")

    def gemm_input(self, x, weights, which):
        q = weights.quant
        if q.act is None:
            return x
        return fake_quantize_fp8_act(x, q.act, q.input_scale(which))


class TorchWeightOnlyExperts(_TorchDequantExperts):
    """4-bit weights (INT4 / NVFP4 / MXFP4) against unquantized activations."""
    quant_schemes = ("int4", "nvfp4", "mxfp4")
