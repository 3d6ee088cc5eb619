"""CUDA graphs for decode steps.

A pure-decode step (every sequence adds one token) of up to the largest
captured batch size replays a graph captured for the next bucket size:
inputs are copied into fixed buffers, padded rows point at a reserved null
KV block and run no adapter, and the logits of the real rows are read back.
The model forward and the LM head run inside the graph; sampling stays
outside.

With LoRA enabled, steps whose tokens use no adapter replay the base graph
(they pay nothing for ``--enable-lora``). Steps with adapters replay a graph
that records the LoRA kernels of exactly the layers the adapters in the
slots touch (an adapter on q/v costs nothing on o_proj, the router or the
experts), captured on first use of that layer set and bucket: slot weights
are zero where an adapter leaves a layer alone and the MoE kernels skip
disabled slots on device flags, so the graph stays right while the slots'
layer set is the same. Past ``MAX_LORA_LAYER_SETS`` sets, one graph with
every LoRA layer serves the rest. Startup runs every bucket once with every
LoRA layer active, so no kernel compiles while serving.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vllm.logger import init_logger
from vllm.lora.punica_wrapper.base import LayerSelection
from vllm.model_executor.layers.attention.backend import AttentionMetadata

if TYPE_CHECKING:
    from vllm.worker.model_runner import ModelInput, ModelRunner

logger = init_logger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 129, 16)) + list(range(160, 513, 32))
    return [s for s in sizes if s <= max_num_seqs] or [1]


MAX_LORA_LAYER_SETS = 4


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor


class DecodeGraphs:
    def __init__(self, runner: "ModelRunner", max_batch: int):
        self.runner = runner
        self.sizes = capture_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        dev = runner.device
        B = self.max_batch
        self.width = -(-runner.config.model_config.max_model_len // runner.block_size)
        self.input_ids = torch.zeros(B, dtype=torch.long, device=dev)
        self.positions = torch.zeros(B, dtype=torch.long, device=dev)
        self.slot_mapping = torch.zeros(B, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(B, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(B, self.width, dtype=torch.int32, device=dev)
        # (bucket, LoRA layer set or None for no LoRA) -> graph
        self.graphs: dict[tuple[int, frozenset[str] | None], _Graph] = {}
        self.lora_layer_sets: set[frozenset[str]] = set()
        self.pool = None

    def _metadata(self, B: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_seqs=B, num_tokens=B, query_start_loc=self.query_start_loc[:B + 1],
            seq_lens=self.seq_lens[:B], block_tables=self.block_tables[:B],
            slot_mapping=self.slot_mapping[:B], max_query_len=1,
            query_start_loc_cpu=list(range(B + 1)), seq_lens_cpu=[1] * B)

    def _reset_inputs(self) -> None:
        null = self.runner.null_block
        self.input_ids.zero_()
        self.positions.zero_()
        self.slot_mapping.fill_(null * self.runner.block_size)
        self.seq_lens.fill_(1)
        self.block_tables.fill_(null)

    def _forward(self, B: int) -> torch.Tensor:
        model = self.runner.model
        return model.compute_logits(model(self.input_ids[:B], self.positions[:B],
                                          self._metadata(B)))

    def _capture(self, B: int, key: frozenset[str] | None) -> None:
        """Capture the bucket's graph from the inputs now in the buffers (a
        warm-up forward first builds what the kernels cache on first use;
        it writes the same KV values the replay will)."""
        self._forward(B)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(B)
        self.pool = graph.pool()
        self.graphs[(B, key)] = _Graph(graph, logits)

    @torch.inference_mode()
    def capture(self) -> None:
        """The base graph of every bucket; with LoRA, also one forward per
        bucket with every LoRA layer active, which compiles their kernels."""
        lora = self.runner.lora_manager
        self._reset_inputs()
        for B in reversed(self.sizes):  # largest first: later graphs reuse its memory
            if lora is not None:
                lora.punica.layer_selection = LayerSelection.ALL
                lora.prepare_step([0] * B)
                for _ in range(2):
                    self._forward(B)
                lora.punica.layer_selection = LayerSelection.STEP
                lora.prepare_step([0] * B)
            self._capture(B, None)
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs for decode batches of up to %d sequences",
                    len(self.graphs), self.max_batch)

    def _lora_key(self, B: int, lora_ids: list[int]) -> frozenset[str]:
        """The LoRA layer set of this step's graph; captures it on first use."""
        lora = self.runner.lora_manager
        key = lora.slot_layers
        selection = LayerSelection.SLOTS
        if key not in self.lora_layer_sets and len(self.lora_layer_sets) >= MAX_LORA_LAYER_SETS:
            key, selection = frozenset(lora.layers), LayerSelection.ALL
        if (B, key) not in self.graphs:
            logger.info("capturing the CUDA graph of %d sequences for LoRA on %d layers",
                        B, len(key))
            lora.punica.layer_selection = selection
            lora.prepare_step(lora_ids)
            try:
                self._capture(B, key)
            finally:
                lora.punica.layer_selection = LayerSelection.STEP
            self.lora_layer_sets.add(key)
        return key

    def can_run(self, inp: "ModelInput") -> bool:
        n = len(inp.seq_lens)
        return (0 < n <= self.max_batch and len(inp.input_ids) == n
                and len(inp.logits_indices) == n and not inp.prompt_logprob_rows)

    def run(self, inp: "ModelInput") -> torch.Tensor:
        """Logits of the step's sequences (in batch order)."""
        runner = self.runner
        n = len(inp.seq_lens)
        B = next(s for s in self.sizes if s >= n)
        pad = B - n
        null = runner.null_block
        bs = runner.block_size
        # fresh pinned staging each step (the caching host allocator recycles
        # it once its copy is done): the previous step's copy may still be queued
        pinned = runner.device.type == "cuda"
        host = torch.empty(4, B, dtype=torch.long, pin_memory=pinned)
        host[0, :n] = torch.tensor(inp.input_ids)
        host[1, :n] = torch.tensor(inp.positions)
        host[2, :n] = torch.tensor(inp.slot_mapping)
        host[3, :n] = torch.tensor(inp.seq_lens)
        host[:, n:] = torch.tensor([0, 0, null * bs, 1]).unsqueeze(1)
        tables = torch.full((B, self.width), null, dtype=torch.int32, pin_memory=pinned)
        used = max(len(b) for b in inp.block_tables)  # one conversion for the whole batch
        tables[:n, :used] = torch.tensor([b + [null] * (used - len(b)) for b in inp.block_tables],
                                         dtype=torch.int32)
        dev = host.to(runner.device, non_blocking=True)
        self.input_ids[:B].copy_(dev[0])
        self.positions[:B].copy_(dev[1])
        self.slot_mapping[:B].copy_(dev[2])
        self.seq_lens[:B].copy_(dev[3])
        self.block_tables[:B].copy_(tables, non_blocking=True)
        runner.fill_pending_tokens(self.input_ids, inp)
        key = None
        if runner.lora_manager is not None:
            ids = inp.token_lora_ids + [0] * pad
            runner.lora_manager.prepare_step(ids)
            if any(ids):
                key = self._lora_key(B, ids)
        entry = self.graphs[(B, key)]
        entry.graph.replay()
        return entry.logits[:n]
