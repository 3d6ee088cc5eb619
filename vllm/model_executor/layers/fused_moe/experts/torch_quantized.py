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
import torch.nn.functional as F

from vllm.model_executor.layers.activation import gated_activation
from vllm.model_executor.layers.fused_moe.experts.base import (ExpertWeights, FusedMoEExperts,
                                                               local_expert_ids)
from vllm.model_executor.quantization.fp8_activation import fake_quantize_fp8_act


class _TorchDequantExperts(FusedMoEExperts):
    name = "torch"
    priority = 0
    quant_schemes: tuple[str, ...] = ()

    @classmethod
    def supports_lora(cls) -> bool:
        return True

    @classmethod
    def unsupported_reason(cls, moe):
        if moe.quant_scheme not in cls.quant_schemes:
            return f"runs {', '.join(cls.quant_schemes)} experts only"
        return None

    def dense_weight(self, weights: ExpertWeights, which: str, e: int) -> torch.Tensor:
        packed = weights.w13 if which == "w13" else weights.w2
        return weights.quant.dequant(packed, which, e)

    def gemm_input(self, x: torch.Tensor, weights: ExpertWeights, which: str) -> torch.Tensor:
        """What the base GEMM reads: ``x`` itself, or its FP8 rounding (W8A8)."""
        return x

    def apply(self, output, hidden_states, weights, topk_weights, topk_ids, *,
              expert_map=None, lora_context=None):
        T, k = topk_ids.shape
        ids = local_expert_ids(topk_ids, expert_map)
        flat = ids.reshape(-1).long()
        token_of_row = torch.arange(T, device=flat.device).repeat_interleave(k)
        act = self.moe.activation
        x = hidden_states
        dtype = x.dtype
        groups = [(e, (flat == e).nonzero().squeeze(1)) for e in flat.unique().tolist() if e >= 0]

        # GEMM 1 on the (possibly FP8-rounded) input; LoRA on the original x
        xq = self.gemm_input(x, weights, "w13")
        cache1 = x.new_zeros(T * k, 2 * self.moe.intermediate_size)
        for e, rows in groups:
            bias = None if weights.w13_bias is None else weights.w13_bias[e]
            w = self.dense_weight(weights, "w13", e).to(dtype)
            cache1[rows] = F.linear(xq[token_of_row[rows]], w, bias)
        alignment = self.apply_w13_lora(lora_context, x, cache1, ids)

        cache2 = gated_activation(cache1, act.kind, act.interleaved, act.alpha, act.limit)

        # GEMM 2 likewise: rounded copy for the base GEMM, cache2 for LoRA
        cache2q = self.gemm_input(cache2, weights, "w2")
        cache3 = x.new_zeros(T * k, self.moe.hidden_size)
        for e, rows in groups:
            bias = None if weights.w2_bias is None else weights.w2_bias[e]
            w = self.dense_weight(weights, "w2", e).to(dtype)
            cache3[rows] = F.linear(cache2q[rows], w, bias)
        self.apply_w2_lora(lora_context, cache2, cache3, topk_weights, alignment,
                           mul_routed_weight=False)

        weighted = cache3.view(T, k, -1) * topk_weights.to(cache3.dtype).unsqueeze(-1)
        output.copy_(weighted.sum(dim=1))


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
