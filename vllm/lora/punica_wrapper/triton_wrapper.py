"""Punica wrapper over the Triton LoRA kernels (the GPU path).

The MoE deltas reuse one alignment for both projections: pairs sorted per
adapter slot and expert in blocks (``moe_lora_align_block_size``), computed
in ``add_lora_w13`` and handed back for ``add_lora_w2``.

Experts whose GEMMs can add LoRA themselves (``moe_lora_in_gemm``) ask
``moe_lora_w13_in_gemm`` / ``moe_lora_w2_in_gemm`` instead: the operands
for the GEMM, after running the shrinks where the GEMM does not.

Shrink outputs hold ``SPLIT_K`` partial sums that expand adds up (one shrink
launch even when K is split). A shrink combine (fully sharded LoRA) needs
the finished sums, so shrinks followed by one are not split.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm import envs
from vllm.lora.ops.triton_ops.fused_moe_lora import (MoELoRAPairShrink, fused_moe_lora_expand,
                                                     fused_moe_lora_shrink,
                                                     fused_moe_lora_shrink_by_pair,
                                                     moe_lora_shrink_by_pair_config,
                                                     pair_shrink_parts)
from vllm.lora.ops.triton_ops.lora_ops import lora_expand, lora_shrink, lora_shrink_split
from vllm.lora.ops.triton_ops.moe_lora_configs import MoELoRALaunch, moe_lora_launch
from vllm.lora.ops.triton_ops.moe_lora_in_gemm import (MAX_FUSED_WIDTH, MoELoRAGemmFusion,
                                                        fused_width, slice_boundaries)
from vllm.lora.punica_wrapper.base import PunicaWrapperBase
from vllm.model_executor.layers.fused_moe.moe_align import moe_lora_align_block_size
from vllm.triton_utils import supports_pdl


FUSION_CHOICES = ("auto", "gemm", "epilogue", "loop", "off")

# Up to this many pairs the w13 GEMM starts while the by-pair shrink runs
# (``MoELoRAGemmFusion.inter_in_flight``) and reads the shrink rows after
# its K loop. H100, Qwen3-30B-A3B and GPT-OSS-20B layers, 4 x r16: ~2 us
# gained at one token, 1-5 us at 8-16 tokens and none lost at 32 since the
# shrink loads its factors as vectors (before that, from 8 tokens the late
# read of the shrink rows by each wave of GEMM programs cost 2-5 us).
SHRINK_OVERLAP_MAX_PAIRS = 256


@dataclass
class MoELoRAAlignment:
    """The per-slot alignment of a step's pairs (None where the shrinks run
    by pair, see ``fused_moe_lora_shrink_by_pair``) and its routing."""
    sorted_pair_ids: torch.Tensor | None      # [L, P]
    expert_ids: torch.Tensor | None           # [L, P // block]
    num_pairs_post_padded: torch.Tensor | None  # [L]
    launch: MoELoRALaunch
    topk_ids: torch.Tensor                    # [T, k], local expert ids
    # the aligned shrinks write the spread layout the GEMMs' LoRA K steps
    # read (fusion "loop", ``MoELoRAGemmFusion.inter_spread``)
    spread: bool = False

    @property
    def by_pair(self) -> bool:
        return self.sorted_pair_ids is None


class TritonPunicaWrapper(PunicaWrapperBase):
    def __init__(self, max_loras: int, device: torch.device, max_num_tokens: int = 0,
                 moe_lora_fusion: str | None = None):
        super().__init__(max_loras, device, max_num_tokens)
        # VLLM_MOE_LORA_FUSION: where experts that can compute LoRA inside their
        # GEMMs do so (auto, gemm, epilogue, loop or off)
        self.moe_lora_fusion = moe_lora_fusion or envs.VLLM_MOE_LORA_FUSION
        if self.moe_lora_fusion not in FUSION_CHOICES:
            raise ValueError(f"unknown MoE LoRA fusion {self.moe_lora_fusion!r}; choose from "
                             f"{', '.join(FUSION_CHOICES)}")

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

    # -- MoE: separate shrink / expand kernels --------------------------------
    def add_lora_w13(self, ctx, x, cache1, topk_ids):
        alignment, inter = self._align_and_shrink_w13(ctx, x, topk_ids,
                                                      self._moe_launch(ctx, x, topk_ids))
        fused_moe_lora_expand(inter, ctx.w13_lora_b, alignment.sorted_pair_ids,
                              alignment.expert_ids, alignment.num_pairs_post_padded,
                              ctx.adapter_enabled, cache1, ctx.w13_slice_offsets,
                              config=alignment.launch.w13_expand)
        return alignment

    def add_lora_w2(self, ctx, cache2, cache3, topk_weights, alignment, mul_routed_weight):
        inter = self._shrink_w2(ctx, cache2, alignment)
        fused_moe_lora_expand(inter, [ctx.w2_lora_b], alignment.sorted_pair_ids,
                              alignment.expert_ids, alignment.num_pairs_post_padded,
                              ctx.adapter_enabled, cache3, [ctx.w2_out_offset],
                              topk_weights if mul_routed_weight else None,
                              config=alignment.launch.w2_expand)

    # -- MoE: LoRA inside the expert GEMMs (moe_lora_in_gemm) -----------------
    def moe_lora_w13_in_gemm(self, ctx, x, topk_ids):
        launch = self._moe_launch(ctx, x, topk_ids)
        mode = self._in_gemm_mode(ctx, launch, 2 * ctx.w2_lora_a.shape[3], x.shape[1])
        if mode is None:
            return None
        if mode == "gemm":
            return self._fusion(ctx, ctx.w13_lora_b, ctx.w13_slice_offsets,
                                lora_a=ctx.w13_lora_a), None
        # "loop" reads the aligned shrinks' spread rows (by pair, the shrinks write parts)
        spread = mode == "loop"
        by_pair = not spread and self._by_pair(ctx, topk_ids)
        alignment, inter = self._align_and_shrink_w13(ctx, x, topk_ids, launch, by_pair, spread)
        # the by-pair shrink is the last kernel before the GEMM: it may overlap it
        overlap = (alignment.by_pair and topk_ids.numel() <= SHRINK_OVERLAP_MAX_PAIRS
                   and supports_pdl(x.device))
        return self._fusion(ctx, ctx.w13_lora_b, ctx.w13_slice_offsets, inter=inter,
                            inter_in_flight=overlap, inter_spread=spread), alignment

    def moe_lora_w2_shrink_in_activation(self, ctx, state, num_pairs):
        if state is None or not state.by_pair:
            return None
        R, intermediate = ctx.w2_lora_a.shape[2:]
        parts = pair_shrink_parts(intermediate, R)
        if parts is None:
            return None
        return MoELoRAPairShrink(ctx.w2_lora_a, state.topk_ids, self.mapping.token_lora_slot,
                                 ctx.adapter_enabled,
                                 self.shrink_parts_buffer(parts, 1, num_pairs, R))

    def moe_lora_w2_in_gemm(self, ctx, cache2, alignment, activation_shrink=None):
        if alignment is None:
            return self._fusion(ctx, [ctx.w2_lora_b], [ctx.w2_out_offset],
                                lora_a=[ctx.w2_lora_a])
        if activation_shrink is not None:
            inter = activation_shrink.out
        else:
            inter = self._shrink_w2(ctx, cache2, alignment)
        return self._fusion(ctx, [ctx.w2_lora_b], [ctx.w2_out_offset], inter=inter,
                            inter_spread=alignment.spread)

    def _in_gemm_mode(self, ctx, launch: MoELoRALaunch, w13_width: int,
                      hidden: int) -> str | None:
        """"gemm", "epilogue", "loop" or None (separate kernels) for this step."""
        fusion = launch.fusion if self.moe_lora_fusion == "auto" else self.moe_lora_fusion
        if fusion == "off":
            return None
        if fused_width(ctx.max_loras, ctx.max_rank) > MAX_FUSED_WIDTH:
            return None
        bounds = (slice_boundaries(ctx.w13_slice_offsets, ctx.w13_lora_b, w13_width)
                  + slice_boundaries([ctx.w2_out_offset], [ctx.w2_lora_b], hidden))
        if any(b % 16 for b in bounds):
            return None  # some column block would straddle a slice
        # a shrink combine (fully sharded LoRA) runs between shrink and expand
        if ctx.w13_shrink_combine is not None or ctx.w2_shrink_combine is not None:
            return "epilogue"
        return fusion

    def _fusion(self, ctx, lora_b, slice_offsets, **shrink) -> MoELoRAGemmFusion:
        return MoELoRAGemmFusion(self.mapping.token_lora_slot, ctx.adapter_enabled, lora_b,
                                 slice_offsets, ctx.top_k, **shrink)

    # -- MoE: shared steps ------------------------------------------------------
    def _moe_launch(self, ctx, x, topk_ids) -> MoELoRALaunch:
        return moe_lora_launch(topk_ids.shape[0], ctx.top_k, ctx.w2_lora_a.shape[1], x.shape[1],
                               ctx.w2_lora_a.shape[3], ctx.max_rank, ctx.w13_rank,
                               ctx.max_loras, x.dtype)

    @staticmethod
    def _by_pair(ctx, topk_ids) -> bool:
        # Each pair reads its factors alone, so higher ranks gain for fewer pairs.
        # H100, 1 adapter of rank 64, Qwen3-30B-A3B / GPT-OSS-20B layers: by pair
        # 0.84 / 0.88 retention at 1 token against 0.65 / 0.79 aligned, but
        # 0.72 / 0.81 at 32 tokens against 0.80 / 0.93; rank 16 gains up to 256
        # pairs (RESULTS.md, sessions 7-8).
        limit = envs.VLLM_MOE_LORA_SHRINK_BY_PAIR_MAX_PAIRS * 256 // max(ctx.max_rank, 16) ** 2
        # fully sharded LoRA (a shrink combine) stays on the aligned path
        return (topk_ids.numel() <= limit
                and ctx.w13_shrink_combine is None and ctx.w2_shrink_combine is None)

    def _align_and_shrink_w13(self, ctx, x, topk_ids, launch: MoELoRALaunch,
                              by_pair: bool = False, spread: bool = False
                              ) -> tuple[MoELoRAAlignment, torch.Tensor]:
        if by_pair:
            alignment = MoELoRAAlignment(None, None, None, launch, topk_ids)
            return alignment, self._shrink_by_pair(ctx, x, ctx.w13_lora_a, topk_ids, True)
        block = launch.block_size_m
        shrink = self._shrink_config(launch.w13_shrink,
                                     ctx.w13_shrink_combine is not None or spread)
        alignment = MoELoRAAlignment(*moe_lora_align_block_size(
            topk_ids, self.mapping.token_lora_slot, block, ctx.w2_lora_a.shape[1],
            ctx.max_loras), launch, topk_ids, spread)
        inter = self._shrink_buffer(shrink["SPLIT_K"], ctx.w13_num_slices, topk_ids.numel(),
                                    ctx.w13_rank, ctx.max_loras, x.dtype, spread)
        fused_moe_lora_shrink(x, ctx.w13_lora_a, alignment.sorted_pair_ids, alignment.expert_ids,
                              alignment.num_pairs_post_padded, ctx.adapter_enabled, ctx.top_k,
                              True, inter, block, shrink, spread)
        if ctx.w13_shrink_combine is not None:
            inter = ctx.w13_shrink_combine(inter[0])
        return alignment, inter

    def _shrink_w2(self, ctx, cache2, alignment: MoELoRAAlignment) -> torch.Tensor:
        if alignment.by_pair:
            return self._shrink_by_pair(ctx, cache2, [ctx.w2_lora_a], alignment.topk_ids, False)
        launch = alignment.launch
        spread = alignment.spread
        shrink = self._shrink_config(launch.w2_shrink,
                                     ctx.w2_shrink_combine is not None or spread)
        inter = self._shrink_buffer(shrink["SPLIT_K"], 1, cache2.shape[0], ctx.max_rank,
                                    ctx.max_loras, cache2.dtype, spread)
        fused_moe_lora_shrink(cache2, [ctx.w2_lora_a], alignment.sorted_pair_ids,
                              alignment.expert_ids, alignment.num_pairs_post_padded,
                              ctx.adapter_enabled, ctx.top_k, False, inter, launch.block_size_m,
                              shrink, spread)
        if ctx.w2_shrink_combine is not None:
            inter = ctx.w2_shrink_combine(inter[0])
        return inter

    def _shrink_by_pair(self, ctx, x, lora_a, topk_ids, gather_rows: bool) -> torch.Tensor:
        R, K = lora_a[0].shape[2:]
        config = moe_lora_shrink_by_pair_config(K)
        inter = self.shrink_parts_buffer(config["SPLIT_K"], len(lora_a), topk_ids.numel(), R)
        fused_moe_lora_shrink_by_pair(x, lora_a, topk_ids, self.mapping.token_lora_slot,
                                      ctx.adapter_enabled, gather_rows, inter, config)
        return inter

    def _shrink_buffer(self, parts: int, num_slices: int, rows: int, rank: int, max_loras: int,
                       dtype: torch.dtype, spread: bool) -> torch.Tensor:
        if not spread:
            return self.shrink_parts_buffer(parts, num_slices, rows, rank)
        # zeros: the spread layout's other slots' columns, and the rows no shrink writes
        return torch.zeros(num_slices, rows, fused_width(max_loras, rank), dtype=dtype,
                           device=self.device)

    @staticmethod
    def _shrink_config(config: dict, unsplit: bool) -> dict:
        # a shrink combine (fully sharded LoRA) needs finished sums, a spread
        # output has one writer per element: no split
        return {**config, "SPLIT_K": 1} if unsplit else config
