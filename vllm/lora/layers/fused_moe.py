"""LoRA on the routed experts.

``FusedMoEWithLoRA`` keeps per-expert gate (w1), up (w3) and down (w2)
factors: two w13 output slices. ``FusedMoE3DWithLoRA`` keeps one fused
gate_up factor pair per expert (one w13 slice), the natural form for models
whose experts are fused on disk (GPT-OSS) and for ``target_parameters``
adapters. Either wrapper accepts either adapter format and converts it
exactly when the adapter is set.

The wrapper does no math itself: ``set_mapping`` builds the step's
``MoELoRAContext`` and ``forward`` hands it to the FusedMoE layer, whose
experts implementation adds the deltas inside its ``apply()``.
"""
from __future__ import annotations

import torch

from vllm.config import LoRAConfig
from vllm.lora.layers.base import BaseLayerWithLoRA, copy_padded, padded, rank_share
from vllm.lora.lora_context import MoELoRAContext
from vllm.lora.peft import LoRAError, LoRALinearWeights, MoELoRAWeights
from vllm.lora.punica_wrapper.base import PunicaWrapperBase
from vllm.model_executor.layers.fused_moe.layer import FusedMoE, w13_rank_rows


class FusedMoEWithLoRA(BaseLayerWithLoRA):
    base_layer: FusedMoE
    w13_num_slices = 2

    def __init__(self, base_layer: FusedMoE):
        super().__init__(base_layer)
        self.lora_context: MoELoRAContext | None = None

    @property
    def interleaved(self) -> bool:
        return self.base_layer.moe_config.activation.interleaved

    def create_lora_weights(self, max_loras: int, config: LoRAConfig,
                            device: torch.device) -> None:
        cfg = self.base_layer.moe_config
        E, H, I, R = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, \
            config.max_lora_rank
        n = 2 * I // self.w13_num_slices

        def zeros(*shape):
            return torch.zeros(*shape, dtype=config.lora_dtype, device=device)

        self.max_loras = max_loras
        self.max_rank = R
        # fully sharded under tensor parallelism: w13's A keeps this rank's
        # share of the rank dim, w2's B its share of the hidden dim
        self.fully_sharded = config.fully_sharded_loras and cfg.tp_size > 1
        shard = cfg.tp_size if self.fully_sharded else 1
        self.w13_lora_a = [zeros(max_loras, E, R // shard, H) for _ in range(self.w13_num_slices)]
        self.w13_lora_b = [zeros(max_loras, E, n, R) for _ in range(self.w13_num_slices)]
        self.w2_lora_a = zeros(max_loras, E, R, I)
        self.w2_lora_b = zeros(max_loras, E, H // shard, R)
        self.adapter_enabled = torch.zeros(max_loras, dtype=torch.int32, device=device)
        self.w13_slice_offsets = [s * n for s in range(self.w13_num_slices)]

    def reset_lora(self, slot: int) -> None:
        for t in [*self.w13_lora_a, *self.w13_lora_b, self.w2_lora_a, self.w2_lora_b]:
            t[slot].zero_()
        self.adapter_enabled[slot] = 0
        self.slots_with_weights.discard(slot)

    def w13_slices(self, weights: MoELoRAWeights) -> list[LoRALinearWeights | None]:
        """Full-size (all experts, unsharded) gate and up factors."""
        if weights.gate_up is None:
            return [weights.gate, weights.up]
        a, b = weights.gate_up.lora_a, weights.gate_up.lora_b
        if self.interleaved:
            gate, up = b[:, 0::2], b[:, 1::2]
        else:
            gate, up = b.chunk(2, dim=1)
        # one shared A serves both halves
        return [LoRALinearWeights(a, gate), LoRALinearWeights(a, up)]

    def check_lora(self, weights: MoELoRAWeights | None) -> None:
        if weights is None:
            return
        for part in self.w13_slices(weights):
            if part is not None and part.rank > self.max_rank:
                raise LoRAError(f"the experts' gate and up factors together have rank "
                                f"{part.rank} in this model's fused layout, above "
                                f"--max-lora-rank {self.max_rank}")

    def _rank_rows(self, b: torch.Tensor) -> torch.Tensor:
        """This rank's output rows of one w13 slice's B [E, n, r]."""
        cfg = self.base_layer.moe_config
        size = b.shape[1] // cfg.tp_size
        return b.narrow(1, cfg.tp_rank * size, size)

    def set_lora(self, slot: int, weights: MoELoRAWeights | None) -> None:
        self.reset_lora(slot)
        if weights is None or not weights.parts():
            return
        cfg = self.base_layer.moe_config
        local = torch.tensor(self.base_layer.local_experts)
        for s, part in enumerate(self.w13_slices(weights)):
            if part is None:
                continue
            a = part.lora_a[local]
            if self.fully_sharded:
                a = rank_share(padded(a, 1, self.max_rank), 1, cfg.tp_rank, cfg.tp_size)
            copy_padded(self.w13_lora_a[s][slot], a)
            copy_padded(self.w13_lora_b[s][slot], self._rank_rows(part.lora_b[local]))
        if weights.down is not None:
            I = cfg.intermediate_size
            copy_padded(self.w2_lora_a[slot],
                        weights.down.lora_a[local].narrow(2, cfg.tp_rank * I, I))
            b = weights.down.lora_b[local]
            if self.fully_sharded:
                b = rank_share(b, 1, cfg.tp_rank, cfg.tp_size)
            copy_padded(self.w2_lora_b[slot], b)
        self.adapter_enabled[slot] = 1
        self.slots_with_weights.add(slot)

    def set_mapping(self, punica: PunicaWrapperBase) -> None:
        super().set_mapping(punica)
        if not self.touched_this_step():
            self.lora_context = None
            return
        self.lora_context = MoELoRAContext(
            w13_lora_a=self.w13_lora_a, w13_lora_b=self.w13_lora_b, w2_lora_a=self.w2_lora_a,
            w2_lora_b=self.w2_lora_b, adapter_enabled=self.adapter_enabled,
            max_loras=self.max_loras, top_k=self.base_layer.moe_config.top_k,
            w13_num_slices=self.w13_num_slices, w13_slice_offsets=self.w13_slice_offsets,
            punica=punica)
        if self.fully_sharded:
            tp = self.base_layer.parallel.tp
            ctx = self.lora_context
            ctx.w13_shrink_combine = lambda t: tp.all_gather(t, dim=-1)
            ctx.w2_shrink_combine = tp.all_reduce
            ctx.w2_out_offset = tp.rank * self.w2_lora_b.shape[2]

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return self.base_layer(hidden_states, router_logits, lora_context=self.lora_context)


class FusedMoE3DWithLoRA(FusedMoEWithLoRA):
    w13_num_slices = 1

    def w13_slices(self, weights: MoELoRAWeights) -> list[LoRALinearWeights | None]:
        if weights.gate_up is not None:
            return [weights.gate_up]
        gate, up = weights.gate, weights.up
        if gate is None and up is None:
            return [None]
        # two independent updates as one of rank r_gate + r_up: A stacked,
        # B block-diagonal (each half of the rows reads only its own ranks)
        ref = gate or up
        E, I, H = ref.lora_b.shape[0], ref.lora_b.shape[1], ref.lora_a.shape[2]
        rg = gate.rank if gate else 0
        ru = up.rank if up else 0
        a = torch.zeros(E, rg + ru, H)
        b = torch.zeros(E, 2 * I, rg + ru)
        gate_rows, up_rows = (slice(0, None, 2), slice(1, None, 2)) if self.interleaved else \
            (slice(0, I), slice(I, 2 * I))
        if gate:
            a[:, :rg] = gate.lora_a
            b[:, gate_rows, :rg] = gate.lora_b
        if up:
            a[:, rg:] = up.lora_a
            b[:, up_rows, rg:] = up.lora_b
        return [LoRALinearWeights(a, b)]

    def _rank_rows(self, b: torch.Tensor) -> torch.Tensor:
        cfg = self.base_layer.moe_config
        return w13_rank_rows(b, 1, self.interleaved, cfg.tp_rank, cfg.tp_size)
