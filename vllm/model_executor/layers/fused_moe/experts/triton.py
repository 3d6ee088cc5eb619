"""Experts through Triton grouped GEMMs over block-aligned (token, expert)
pairs. Both GEMMs write rows indexed by pair, so LoRA deltas are added in
place between the steps exactly as in the torch reference. Triton is
imported only inside ``apply()``: this module must import without it."""
from __future__ import annotations

import torch

from vllm.model_executor.layers.activation import gated_activation
from vllm.model_executor.layers.fused_moe.experts.base import FusedMoEExperts, local_expert_ids
from vllm.model_executor.layers.fused_moe.moe_align import moe_align_block_size
from vllm.triton_utils import has_triton


class TritonExperts(FusedMoEExperts):
    """Unquantized experts on CUDA: align, GEMM 1, activation, GEMM 2 (with
    the routing weights folded in), sum over the k experts of each token."""
    name = "triton"
    priority = 10
    supports_cuda_graphs = True

    @classmethod
    def supports_lora(cls) -> bool:
        return True

    @classmethod
    def unsupported_reason(cls, moe):
        if moe.device != "cuda":
            return "needs a CUDA device"
        if not has_triton():
            return "triton is not installed"
        if moe.quant_scheme != "unquantized":
            return "unquantized weights only"
        return None

    def apply(self, output, hidden_states, weights, topk_weights, topk_ids, *,
              expert_map=None, lora_context=None):
        from vllm.model_executor.layers.fused_moe.kernels.fused_moe_gemm import (
            invoke_fused_moe_gemm, moe_block_size)
        T, k = topk_ids.shape
        E = self.moe.num_local_experts
        act = self.moe.activation
        x = hidden_states

        # (a) sort pairs by local expert in blocks of the GEMMs' BLOCK_SIZE_M
        ids = local_expert_ids(topk_ids, expert_map)
        sorted_pair_ids, expert_ids, num_pairs_post_padded = moe_align_block_size(
            ids, moe_block_size(T * k, E), E)
        aligned = dict(sorted_pair_ids=sorted_pair_ids, expert_ids=expert_ids,
                       num_pairs_post_padded=num_pairs_post_padded, top_k=k)

        # (b) GEMM 1: cache1[t*k + j] = x[t] @ w13[e].T (+ bias)
        cache1 = x.new_empty(T * k, 2 * self.moe.intermediate_size)
        invoke_fused_moe_gemm(x, weights.w13, cache1, gather_rows=True, bias=weights.w13_bias,
                              **aligned)
        # (c)
        alignment = self.apply_w13_lora(lora_context, x, cache1, ids)

        # (d)
        cache2 = gated_activation(cache1, act.kind, act.interleaved, act.alpha, act.limit)

        # (e) GEMM 2: cache3[row] = (cache2[row] @ w2[e].T + bias) * routing weight.
        # Pairs routed to other ranks are in no block and keep their zeros.
        if expert_map is None:
            cache3 = x.new_empty(T * k, self.moe.hidden_size)
        else:
            cache3 = x.new_zeros(T * k, self.moe.hidden_size)
        invoke_fused_moe_gemm(cache2, weights.w2, cache3, gather_rows=False,
                              bias=weights.w2_bias, topk_weights=topk_weights, **aligned)
        # (f)
        self.apply_w2_lora(lora_context, cache2, cache3, topk_weights, alignment,
                           mul_routed_weight=True)

        # (g)
        torch.sum(cache3.view(T, k, self.moe.hidden_size), dim=1, out=output)
