"""Experts through Triton grouped GEMMs over block-aligned (token, expert)
pairs. Both GEMMs write rows indexed by pair, so LoRA deltas are added in
place between the steps exactly as in the torch reference.

``TritonGroupedExperts`` holds the steps every Triton experts class shares;
each weight format (bf16 here, FP8 and 4-bit weight-only in their modules)
only supplies its grouped GEMM. A GEMM receives the unquantized activation
and quantizes privately if its format needs to, so the LoRA hooks always see
unquantized activations. Triton is imported only inside the GEMMs: these
modules must import without it."""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from vllm.model_executor.layers.fused_moe.experts.base import (ExpertWeights, FusedMoEExperts,
                                                               local_expert_ids)
from vllm.model_executor.layers.fused_moe.moe_align import (moe_align_block_size,
                                                            one_token_alignment)
from vllm.triton_utils import has_triton


class TritonGroupedExperts(FusedMoEExperts):
    """Align pairs, GEMM 1, w13 LoRA, activation, GEMM 2 (routing weights
    folded in), w2 LoRA, sum over each token's k experts."""
    priority = 10
    supports_cuda_graphs = True
    # Whether gemm() takes a ``lora`` (MoELoRAGemmFusion) and adds it itself;
    # such a gemm() launches the GEMM before any other kernel, because the
    # LoRA shrink it reads may still be running (``inter_in_flight``).
    gemm_adds_lora: ClassVar[bool] = False

    def __init__(self, moe):
        super().__init__(moe)
        # one_token_alignment per (block size, device): built on the first
        # one-token step, which runs eagerly before CUDA graphs capture it
        self._one_token_alignments: dict[tuple[int, torch.device], tuple] = {}

    @classmethod
    def supports_lora(cls) -> bool:
        return True

    @classmethod
    def unsupported_reason(cls, moe):
        reason = super().unsupported_reason(moe)
        if reason is not None:
            return reason
        if moe.device != "cuda":
            return "needs a CUDA device"
        if not has_triton():
            return "triton is not installed"
        return None

    def gemm(self, a: torch.Tensor, weights: ExpertWeights, which: str, out: torch.Tensor,
             aligned: dict, gather_rows: bool, topk_weights: torch.Tensor | None = None,
             lora: Any = None) -> None:
        """``out[p] = (a[row(p)] @ W_e.T + bias_e) (* topk_weights[p])`` for the
        ``which`` ("w13" or "w2") weights of each aligned pair's expert, plus
        the pair's LoRA delta when ``lora`` (a ``MoELoRAGemmFusion``) is given;
        apply() gives one only where ``gemm_adds_lora``."""
        raise NotImplementedError

    def block_size(self, num_tokens: int) -> int:
        """BLOCK_SIZE_M of both GEMMs (and of the pair alignment) for a step."""
        from vllm.model_executor.layers.fused_moe.kernels.fused_moe_gemm import moe_block_size
        return moe_block_size(num_tokens * self.moe.top_k, self.moe.num_local_experts)

    def align(self, ids: torch.Tensor) -> dict:
        """The GEMMs' alignment of a step's pairs (``ids``: [T, k] local
        expert ids). One token needs no alignment kernel (3-4 µs of a 50 µs
        decode layer on the H100): ``one_token_alignment``."""
        T, k = ids.shape
        block = self.block_size(T)
        key = (block, ids.device)
        if T == 1 and key not in self._one_token_alignments and not (
                ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            self._one_token_alignments[key] = one_token_alignment(k, block, ids.device)
        if T == 1 and key in self._one_token_alignments:
            sorted_pair_ids, num_pairs_post_padded = self._one_token_alignments[key]
            expert_ids = ids.reshape(-1)
        else:
            sorted_pair_ids, expert_ids, num_pairs_post_padded = moe_align_block_size(
                ids, block, self.moe.num_local_experts)
        return dict(sorted_pair_ids=sorted_pair_ids, expert_ids=expert_ids,
                    num_pairs_post_padded=num_pairs_post_padded, top_k=k)

    def apply(self, output, hidden_states, weights, topk_weights, topk_ids, *,
              expert_map=None, lora_context=None):
        T, k = topk_ids.shape
        act = self.moe.activation
        x = hidden_states

        # (a) sort pairs by local expert in blocks of the GEMMs' BLOCK_SIZE_M
        ids = local_expert_ids(topk_ids, expert_map)
        aligned = self.align(ids)

        # LoRA inside the GEMMs where this class and the step allow it
        in_gemm = None
        if lora_context is not None and self.gemm_adds_lora:
            in_gemm = lora_context.punica.moe_lora_w13_in_gemm(lora_context, x, ids)
        lora13, state = in_gemm if in_gemm is not None else (None, None)

        # (b) GEMM 1: cache1[t*k + j] = x[t] @ w13[e].T (+ bias)
        cache1 = x.new_empty(T * k, 2 * self.moe.intermediate_size)
        self.gemm(x, weights, "w13", cache1, aligned, gather_rows=True, lora=lora13)
        # (c) LoRA on the unquantized x
        if in_gemm is None:
            state = self.apply_w13_lora(lora_context, x, cache1, ids)

        # (d), with the w2 LoRA shrink where the step's LoRA allows it
        from vllm.model_executor.layers.fused_moe.kernels.gated_activation import (
            gated_activation_triton)
        shrink2 = None
        if in_gemm is not None:
            shrink2 = lora_context.punica.moe_lora_w2_shrink_in_activation(lora_context, state,
                                                                          T * k)
        cache2 = gated_activation_triton(cache1, act.kind, act.interleaved, act.alpha,
                                         act.limit, lora_shrink=shrink2)

        # (e) GEMM 2: cache3[row] = (cache2[row] @ w2[e].T + bias) * routing weight.
        # Pairs routed to other ranks are in no block and keep their zeros.
        if expert_map is None:
            cache3 = x.new_empty(T * k, self.moe.hidden_size)
        else:
            cache3 = x.new_zeros(T * k, self.moe.hidden_size)
        lora2 = None
        if in_gemm is not None:
            lora2 = lora_context.punica.moe_lora_w2_in_gemm(lora_context, cache2, state,
                                                            shrink2)
        self.gemm(cache2, weights, "w2", cache3, aligned, gather_rows=False,
                  topk_weights=topk_weights, lora=lora2)
        # (f) LoRA on the unquantized cache2
        if in_gemm is None:
            self.apply_w2_lora(lora_context, cache2, cache3, topk_weights, state,
                               mul_routed_weight=True)

        # (g) torch's reduce took ~5 µs of a 1-token layer on the H100
        from vllm.model_executor.layers.fused_moe.kernels.moe_sum import moe_sum_triton
        moe_sum_triton(cache3, k, output)


class TritonExperts(TritonGroupedExperts):
    """Unquantized experts on CUDA, with tuned launch configurations where
    the package has them for this device and shape (kernels/tuned_configs.py).
    Its GEMMs add MoE LoRA themselves (lora/ops/triton_ops/moe_lora_in_gemm.py)."""
    name = "triton"
    gemm_adds_lora = True

    def _configs(self, num_tokens: int, lora: bool = False) -> tuple[dict, dict]:
        from vllm.model_executor.layers.fused_moe.kernels.tuned_configs import (
            expert_gemm_configs)
        m = self.moe
        return expert_gemm_configs(num_tokens, m.top_k, m.num_local_experts, m.hidden_size,
                                   m.intermediate_size, m.dtype, lora)

    def block_size(self, num_tokens: int) -> int:
        return self._configs(num_tokens)[0]["BLOCK_SIZE_M"]

    def gemm(self, a, weights, which, out, aligned, gather_rows, topk_weights=None, lora=None):
        from vllm.model_executor.layers.fused_moe.kernels.fused_moe_gemm import (
            invoke_fused_moe_gemm)
        w13 = which == "w13"
        num_tokens = a.shape[0] if gather_rows else a.shape[0] // aligned["top_k"]
        config = self._configs(num_tokens, lora is not None)[0 if w13 else 1]
        invoke_fused_moe_gemm(a, weights.w13 if w13 else weights.w2, out, gather_rows=gather_rows,
                              bias=weights.w13_bias if w13 else weights.w2_bias,
                              topk_weights=topk_weights, config=config, lora=lora, **aligned)
