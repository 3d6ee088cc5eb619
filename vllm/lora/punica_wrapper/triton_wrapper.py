"""Punica wrapper over the Triton LoRA kernels (the GPU path).

The MoE deltas reuse one alignment for both projections: pairs sorted per
adapter slot and expert in blocks (``moe_lora_align_block_size``), computed
in ``add_lora_w13`` and handed back for ``add_lora_w2``.

Shrink outputs hold ``SPLIT_K`` partial sums that expand adds up (one shrink
launch even when K is split). A shrink combine (fully sharded LoRA) needs
the finished sums, so shrinks followed by one are not split.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm.lora.ops.triton_ops.fused_moe_lora import fused_moe_lora_expand, fused_moe_lora_shrink
from vllm.lora.ops.triton_ops.lora_ops import lora_expand, lora_shrink, lora_shrink_split
from vllm.lora.ops.triton_ops.moe_lora_configs import MoELoRALaunch, moe_lora_launch
from vllm.lora.punica_wrapper.base import PunicaWrapperBase
from vllm.model_executor.layers.fused_moe.moe_align import moe_lora_align_block_size


@dataclass
class MoELoRAAlignment:
    sorted_pair_ids: torch.Tensor      # [L, P]
    expert_ids: torch.Tensor           # [L, P // block]
    num_pairs_post_padded: torch.Tensor  # [L]
    launch: MoELoRALaunch


class TritonPunicaWrapper(PunicaWrapperBase):
    def shrink_parts_buffer(self, parts: int, num_slices: int, rows: int,
                            rank: int) -> torch.Tensor:
        # the kernels write every row they later read
        return torch.empty(parts, num_slices, rows, rank, dtype=torch.float32,
                           device=self.device)

    def add_lora_linear(self, y, x, lora_a, lora_b, slice_offsets, combine_shrink=None):
        R = lora_a[0].shape[1]
        parts = 1 if combine_shrink else lora_shrink_split(x.shape[0], x.shape[1], R, x.dtype)
        inter = self.shrink_parts_buffer(parts, len(lora_a), x.shape[0], R)
        lora_shrink(x, lora_a, self.mapping, inter)
        if combine_shrink is not None:
            inter = combine_shrink(inter[0])
        lora_expand(inter, lora_b, self.mapping, y, slice_offsets)

    def add_lora_w13(self, ctx, x, cache1, topk_ids):
        num_experts = ctx.w2_lora_a.shape[1]
        launch = moe_lora_launch(topk_ids.shape[0], ctx.top_k, num_experts, x.shape[1],
                                 ctx.w2_lora_a.shape[3], ctx.max_rank, ctx.w13_rank,
                                 ctx.max_loras, x.dtype)
        block = launch.block_size_m
        alignment = MoELoRAAlignment(*moe_lora_align_block_size(
            topk_ids, self.mapping.token_lora_slot, block, num_experts, ctx.max_loras), launch)
        shrink = self._shrink_config(launch.w13_shrink, ctx.w13_shrink_combine)
        inter = self.shrink_parts_buffer(shrink["SPLIT_K"], ctx.w13_num_slices, cache1.shape[0],
                                         ctx.w13_rank)
        fused_moe_lora_shrink(x, ctx.w13_lora_a, alignment.sorted_pair_ids, alignment.expert_ids,
                              alignment.num_pairs_post_padded, ctx.adapter_enabled, ctx.top_k,
                              True, inter, block, shrink)
        if ctx.w13_shrink_combine is not None:
            inter = ctx.w13_shrink_combine(inter[0])
        fused_moe_lora_expand(inter, ctx.w13_lora_b, alignment.sorted_pair_ids,
                              alignment.expert_ids, alignment.num_pairs_post_padded,
                              ctx.adapter_enabled, cache1, ctx.w13_slice_offsets,
                              config=launch.w13_expand)
        return alignment

    def add_lora_w2(self, ctx, cache2, cache3, topk_weights, alignment, mul_routed_weight):
        launch = alignment.launch
        shrink = self._shrink_config(launch.w2_shrink, ctx.w2_shrink_combine)
        inter = self.shrink_parts_buffer(shrink["SPLIT_K"], 1, cache2.shape[0], ctx.max_rank)
        fused_moe_lora_shrink(cache2, [ctx.w2_lora_a], alignment.sorted_pair_ids,
                              alignment.expert_ids, alignment.num_pairs_post_padded,
                              ctx.adapter_enabled, ctx.top_k, False, inter, launch.block_size_m,
                              shrink)
        if ctx.w2_shrink_combine is not None:
            inter = ctx.w2_shrink_combine(inter[0])
        fused_moe_lora_expand(inter, [ctx.w2_lora_b], alignment.sorted_pair_ids,
                              alignment.expert_ids, alignment.num_pairs_post_padded,
                              ctx.adapter_enabled, cache3, [ctx.w2_out_offset],
                              topk_weights if mul_routed_weight else None,
                              config=launch.w2_expand)

    @staticmethod
    def _shrink_config(config: dict, combine) -> dict:
        # a shrink combine (fully sharded LoRA) needs finished sums: no split
        return config if combine is None else {**config, "SPLIT_K": 1}
