"""LoRA on linear layers: QKV, merged gate/up, column-, row-parallel and
replicated linears, all through one wrapper.

The base layer declares how it is split across tensor-parallel ranks
(``shard_layout`` per output slice, ``shard_input``), and the wrapper
slices the adapter the same way when it is set: B by the slice's output
rows for output-sharded layers, A by input columns for input-sharded ones
(their partial deltas are summed by the layer's own all-reduce).
"""
from __future__ import annotations

import itertools

import torch

from vllm.config import LoRAConfig
from vllm.lora.layers.base import BaseLayerWithLoRA, copy_padded, padded, rank_share
from vllm.lora.peft import LoRALinearWeights
from vllm.model_executor.layers.linear import LinearBase


class LinearWithLoRA(BaseLayerWithLoRA):
    base_layer: LinearBase

    def __init__(self, base_layer: LinearBase):
        super().__init__(base_layer)
        sizes = base_layer.output_partition_sizes
        self.slice_offsets = [0, *itertools.accumulate(sizes)][:-1]

    def create_lora_weights(self, max_loras: int, config: LoRAConfig,
                            device: torch.device) -> None:
        base, rank, dtype = self.base_layer, config.max_lora_rank, config.lora_dtype
        tp = base.tp
        # fully sharded: column layers keep a share of A's rank dim (shrink
        # outputs are all-gathered), row layers a share of B's output rows
        # (shrink outputs are all-reduced)
        self.shard_a_rank = config.fully_sharded_loras and base.shard_output
        self.shard_b_rows = config.fully_sharded_loras and base.shard_input
        self.max_rank = rank
        a_rank = rank // tp.world_size if self.shard_a_rank else rank
        b_rows = [n // tp.world_size if self.shard_b_rows else n
                  for n in base.output_partition_sizes]
        if self.shard_b_rows:
            self.slice_offsets = [tp.rank * b_rows[0]]
        self.lora_a = [torch.zeros(max_loras, a_rank, base.input_size_per_partition, dtype=dtype,
                                   device=device) for _ in base.output_partition_sizes]
        self.lora_b = [torch.zeros(max_loras, n, rank, dtype=dtype, device=device)
                       for n in b_rows]

    def reset_lora(self, slot: int) -> None:
        for t in self.lora_a + self.lora_b:
            t[slot].zero_()
        self.slots_with_weights.discard(slot)

    def set_lora(self, slot: int, weights: list[LoRALinearWeights | None] | None) -> None:
        self.reset_lora(slot)
        if not weights or all(w is None for w in weights):
            return
        base = self.base_layer
        tp = base.tp
        for i, w in enumerate(weights):
            if w is None:
                continue
            a, b = w.lora_a, w.lora_b
            if base.shard_input:
                cols = base.input_size_per_partition
                a = a.narrow(1, tp.rank * cols, cols)
            if base.shard_output:
                _, size, start = base.shard_layout(i)
                b = b.narrow(0, start, size)
            if self.shard_a_rank:
                a = rank_share(padded(a, 0, self.max_rank), 0, tp.rank, tp.world_size)
            if self.shard_b_rows:
                b = rank_share(b, 0, tp.rank, tp.world_size)
            copy_padded(self.lora_a[i][slot], a)
            copy_padded(self.lora_b[i][slot], b)
        self.slots_with_weights.add(slot)

    def _combine_shrink(self):
        tp = self.base_layer.tp
        if self.shard_a_rank:
            return lambda t: tp.all_gather(t, dim=-1)
        if self.shard_b_rows:
            return tp.all_reduce
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer.matmul(x)
        if self.touched_this_step():
            # a float32 layer (e.g. a router) with adapters in the model dtype
            x_lora = x.to(self.lora_a[0].dtype)
            self.punica.add_lora_linear(y, x_lora, self.lora_a, self.lora_b, self.slice_offsets,
                                        self._combine_shrink())
        return self.base_layer.reduce(y)
