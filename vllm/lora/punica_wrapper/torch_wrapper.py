"""Punica wrapper over the torch reference ops (the CPU path)."""
from __future__ import annotations

from vllm.lora.ops import torch_ops
from vllm.lora.punica_wrapper.base import PunicaWrapperBase


class TorchPunicaWrapper(PunicaWrapperBase):
    def add_lora_linear(self, y, x, lora_a, lora_b, slice_offsets, combine_shrink=None):
        inter = self.shrink_buffer(len(lora_a), x.shape[0], lora_a[0].shape[1])
        torch_ops.lora_shrink(x, lora_a, self.mapping, inter)
        if combine_shrink is not None:
            inter = combine_shrink(inter)
        torch_ops.lora_expand(inter, lora_b, self.mapping, y, slice_offsets)

    def add_lora_w13(self, ctx, x, cache1, topk_ids):
        groups = torch_ops.moe_lora_groups(topk_ids, self.mapping.token_lora_slot,
                                           ctx.adapter_enabled)
        inter = self.shrink_buffer(ctx.w13_num_slices, cache1.shape[0], ctx.w13_rank)
        torch_ops.fused_moe_lora_shrink(x, ctx.w13_lora_a, groups, ctx.top_k, True, inter)
        if ctx.w13_shrink_combine is not None:
            inter = ctx.w13_shrink_combine(inter)
        torch_ops.fused_moe_lora_expand(inter, ctx.w13_lora_b, groups, cache1,
                                        ctx.w13_slice_offsets)
        return groups

    def add_lora_w2(self, ctx, cache2, cache3, topk_weights, alignment, mul_routed_weight):
        inter = self.shrink_buffer(1, cache2.shape[0], ctx.max_rank)
        torch_ops.fused_moe_lora_shrink(cache2, [ctx.w2_lora_a], alignment, ctx.top_k, False,
                                        inter)
        if ctx.w2_shrink_combine is not None:
            inter = ctx.w2_shrink_combine(inter)
        torch_ops.fused_moe_lora_expand(inter, [ctx.w2_lora_b], alignment, cache3,
                                        [ctx.w2_out_offset],
                                        topk_weights if mul_routed_weight else None)
