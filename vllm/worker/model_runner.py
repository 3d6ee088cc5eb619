"""Turns a scheduled batch into tensors, runs the model and samples.

The runner owns the model, the per-layer KV cache tensors and the sampler.
``prepare_inputs`` is pure bookkeeping on host lists; ``execute`` does the
device work without waiting for the device: inputs go over from pinned
memory, the sampled tokens come back through a ``PendingSamplerOutput``, and
tokens the host has not seen yet (async scheduling) are read on the device
from the previous step's sampler output.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from vllm import envs
from vllm.config import VllmConfig
from vllm.core.request import Request
from vllm.core.scheduler import ScheduledBatch
from vllm.distributed.parallel_state import ParallelContext
from vllm.logger import init_logger
from vllm.model_executor.build_context import ModelBuildContext
from vllm.model_executor.layers.attention.backend import AttentionMetadata
from vllm.model_executor.layers.attention.layer import Attention
from vllm.model_executor.layers.attention.selector import get_attention_backend
from vllm.model_executor.layers.sampler import (PendingSamplerOutput, PromptLogprobsOutput,
                                                Sampler, SamplerOutput, SamplingMetadata)
from vllm.model_executor.model_loader.loader import load_model
from vllm.model_executor.quantization import get_quantization_config

logger = init_logger(__name__)


@dataclass
class ModelInput:
    """Host-side description of one step, cheap to send to other ranks."""
    input_ids: list[int]
    positions: list[int]
    query_start_loc: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    slot_mapping: list[int]
    logits_indices: list[int]       # rows of the flattened batch whose next token is sampled
    token_lora_ids: list[int]       # adapter id per token (0: none)
    # rows whose next prompt token's logprob was asked for, and those tokens
    prompt_logprob_rows: list[int] = field(default_factory=list)
    prompt_logprob_targets: list[int] = field(default_factory=list)
    prompt_logprob_top: int = 0
    # rows whose token the previous step sampled and the host has not seen
    # (its placeholder in input_ids is 0), and those tokens' rows in that
    # step's sampler output
    pending_rows: list[int] = field(default_factory=list)
    pending_sources: list[int] = field(default_factory=list)


class ModelRunner:
    def __init__(self, config: VllmConfig, parallel: ParallelContext | None = None,
                 progress: bool = True):
        self.config = config
        mc = config.model_config
        self.device = torch.device(config.device_config.device)
        self.block_size = config.cache_config.block_size
        self.parallel = parallel or ParallelContext.single()
        self.attention_backend = get_attention_backend(config.kernel_config.attention_backend,
                                                       self.device.type)
        ctx = ModelBuildContext(
            hf_config=mc.hf_config, dtype=mc.dtype, device=self.device.type,
            attention_backend=self.attention_backend, max_model_len=mc.max_model_len,
            parallel=self.parallel, moe_backend=config.kernel_config.moe_backend,
            lora_enabled=config.lora_config is not None,
            quant_config=get_quantization_config(mc.model, mc.hf_config, mc.architecture))
        self.model = load_model(mc.model, mc.architecture, ctx, progress=progress)
        self.lora_manager = None
        if config.lora_config is not None:
            from vllm.lora.model_manager import LoRAModelManager
            self.lora_manager = LoRAModelManager(self.model, config.lora_config, self.device,
                                                 config.scheduler_config.max_num_batched_tokens)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        self.null_block = 0  # a block no request owns; padded rows write here
        self.graphs = None
        self.last_sampled: torch.Tensor | None = None  # the last step's tokens, on the device

    # -- KV cache -----------------------------------------------------------------
    def block_bytes(self) -> int:
        dtype_size = torch.empty((), dtype=self.config.model_config.dtype).element_size()
        return sum(2 * self.block_size * a.num_kv_heads * a.head_size * dtype_size
                   for a in self.attn_layers)

    def determine_num_blocks(self) -> int:
        cache = self.config.cache_config
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        sched, mc = self.config.scheduler_config, self.config.model_config
        blocks_per_seq = -(-mc.max_model_len // self.block_size)
        useful = sched.max_num_seqs * blocks_per_seq  # more could never be used
        if self.device.type == "cpu":
            budget = int(envs.VLLM_CPU_KVCACHE_SPACE * (1 << 30))
        else:
            budget = self._profile_free_gpu_memory()
        blocks = min(useful, budget // self.block_bytes() - 1)  # one more for the null block
        if blocks < 1:
            raise RuntimeError("no memory left for the KV cache; lower --max-model-len or "
                               "raise --gpu-memory-utilization")
        return blocks

    def _profile_free_gpu_memory(self) -> int:
        """Run the largest step the scheduler can issue and give the KV cache
        what remains of the memory budget after its peak."""
        sched = self.config.scheduler_config
        tokens = min(sched.max_num_batched_tokens, self.config.model_config.max_model_len)
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()  # weights and adapter slots
        self.init_kv_cache(-(-tokens // self.block_size))
        torch.cuda.reset_peak_memory_stats()
        dummy = ModelInput(input_ids=[0] * tokens, positions=list(range(tokens)),
                           query_start_loc=[0, tokens], seq_lens=[tokens],
                           block_tables=[list(range(-(-tokens // self.block_size)))],
                           slot_mapping=list(range(tokens)),
                           logits_indices=[tokens - 1] * min(sched.max_num_seqs, tokens),
                           token_lora_ids=[0] * tokens)
        with torch.inference_mode():
            hidden = self._forward(dummy)
            self.model.compute_logits(hidden[torch.tensor(dummy.logits_indices,
                                                          device=self.device)])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        self.kv_caches = []
        for layer in self.attn_layers:
            layer.kv_cache = None
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        budget = int(total * self.config.cache_config.gpu_memory_utilization) - peak
        if not self.config.model_config.enforce_eager:
            # decode graphs keep their activations: those of the largest
            # captured batch, scaled from this step's, plus slack
            from vllm.worker.cuda_graphs import capture_sizes
            largest = capture_sizes(min(sched.max_num_seqs, 512))[-1]
            budget -= (peak - resident) * min(1.0, largest / tokens) + (256 << 20)
        budget = max(int(budget), 0)
        logger.info("memory profile: peak %.2f GiB during a %d-token step; %.2f GiB for KV cache",
                    peak / 2**30, tokens, budget / 2**30)
        return budget

    def init_kv_cache(self, num_blocks: int) -> None:
        """``num_blocks`` usable blocks plus the null block (the last one)."""
        dtype = self.config.model_config.dtype
        self.kv_caches = []
        self.null_block = num_blocks
        for layer in self.attn_layers:
            cache = torch.empty(2, num_blocks + 1, self.block_size, layer.num_kv_heads,
                                layer.head_size, dtype=dtype, device=self.device)
            layer.kv_cache = cache
            self.kv_caches.append(cache)

    def release_cuda_graphs(self) -> None:
        """Destroy the captured graphs. Graphs that recorded NCCL collectives
        pin their communicator, whose teardown then waits forever: every rank
        calls this before the process group is destroyed."""
        if self.graphs is None:
            return
        self.graphs = None
        import gc
        gc.collect()
        torch.cuda.synchronize(self.device)

    def capture_cuda_graphs(self) -> None:
        if self.device.type != "cuda" or self.config.model_config.enforce_eager:
            return
        from vllm.model_executor.layers.fused_moe.layer import FusedMoE
        unsafe = {type(k.experts).__name__ for m in self.model.modules()
                  if isinstance(m, FusedMoE) for k in m.quant_method.kernels()
                  if not k.experts.supports_cuda_graphs}
        if not self.attention_backend.supports_cuda_graphs:
            unsafe.add(type(self.attention_backend).__name__)
        if unsafe:
            logger.info("CUDA graphs off: %s cannot be captured", ", ".join(sorted(unsafe)))
            return
        from vllm.worker.cuda_graphs import DecodeGraphs
        self.graphs = DecodeGraphs(self, min(self.config.scheduler_config.max_num_seqs, 512))
        self.graphs.capture()

    # -- adapters ---------------------------------------------------------------------
    def add_lora(self, request) -> None:
        if self.lora_manager is None:
            raise ValueError("LoRA is not enabled")
        self.lora_manager.load_adapter(request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.lora_manager is not None and self.lora_manager.remove_adapter(lora_int_id)

    # -- one step -------------------------------------------------------------------
    def prepare_inputs(self, batch: ScheduledBatch) -> ModelInput:
        bs = self.block_size
        inp = ModelInput([], [], [0], [], [], [], [], [])
        for request, n in zip(batch.requests, batch.num_new_tokens):
            start = request.num_computed_tokens
            end = start + n
            prompt, known = request.prompt_token_ids, request.num_known_tokens
            inp.input_ids.extend(prompt[start:min(end, len(prompt))])
            if end > len(prompt):
                inp.input_ids.extend(request.output_token_ids[max(start - len(prompt), 0):
                                                              min(end, known) - len(prompt)])
            if end > known:
                # only the step in flight can hold this request's unseen tokens
                assert end - known <= len(request.pending_rows) == 1
                inp.pending_rows.append(len(inp.input_ids))
                inp.pending_sources.append(request.pending_rows[0])
                inp.input_ids.append(0)
            inp.positions.extend(range(start, end))
            inp.query_start_loc.append(inp.query_start_loc[-1] + n)
            inp.seq_lens.append(end)
            inp.block_tables.append(request.block_ids)
            blocks = request.block_ids
            inp.slot_mapping.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            inp.token_lora_ids.extend([request.lora_int_id] * n)
            span = request.prompt_logprob_span(start, n)
            if span:
                first_row = inp.query_start_loc[-1] - n
                inp.prompt_logprob_rows.extend(first_row + p - start for p in span)
                inp.prompt_logprob_targets.extend(request.prompt_token_ids[p + 1] for p in span)
                inp.prompt_logprob_top = max(inp.prompt_logprob_top,
                                             request.sampling_params.prompt_logprobs)
            if end == request.num_tokens:
                inp.logits_indices.append(inp.query_start_loc[-1] - 1)
        return inp

    def sampling_metadata(self, requests: list[Request]) -> SamplingMetadata:
        params = [r.sampling_params for r in requests]
        # every per-row setting in one async copy
        rows = self._to_device([[0.0 if p.greedy else p.temperature for p in params],
                                [p.top_p for p in params], [p.top_k for p in params],
                                [p.min_p for p in params], [p.presence_penalty for p in params],
                                [p.frequency_penalty for p in params],
                                [p.repetition_penalty for p in params]], torch.float32)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        blocked_rows, blocked_ids = [], []
        for i, r in enumerate(requests):
            p = r.sampling_params
            if r.num_generated_tokens < p.min_tokens:
                blocked_rows.extend([i] * len(p.all_stop_token_ids))
                blocked_ids.extend(p.all_stop_token_ids)
        random_dev = blocked_dev = blocked_ids_dev = None
        if random_rows or blocked_rows:
            random_dev, blocked_dev, blocked_ids_dev = self._to_device(
                [random_rows, blocked_rows, blocked_ids], torch.long)
        asked = [p.logprobs for p in params if p.logprobs is not None]
        no_penalties = all(p.no_penalties for p in params)
        penalty_pairs = [None] * 4 if no_penalties else self._penalty_pairs(requests)
        return SamplingMetadata(
            temperature=rows[0], top_p=rows[1], top_k=rows[2].long(), min_p=rows[3],
            presence_penalty=rows[4], frequency_penalty=rows[5], repetition_penalty=rows[6],
            generators={i: r.generator for i, r in enumerate(requests) if r.generator is not None},
            penalty_output_rows=penalty_pairs[0], penalty_output_ids=penalty_pairs[1],
            penalty_prompt_rows=penalty_pairs[2], penalty_prompt_ids=penalty_pairs[3],
            random_rows=random_rows, random_rows_device=random_dev,
            blocked_rows=blocked_dev if blocked_rows else None,
            blocked_token_ids=blocked_ids_dev if blocked_rows else None,
            max_num_logprobs=max(asked) if asked else None,
            no_penalties=no_penalties)

    def _penalty_pairs(self, requests: list[Request]) -> list[torch.Tensor]:
        """(row, token id) of every generated and every prompt token, on the
        device; a generated token still on the device (async scheduling) is
        read there, from the previous step's sampler output."""
        out_rows, out_ids, prompt_rows, prompt_ids, pending_rows, pending_sources = \
            [], [], [], [], [], []
        for i, r in enumerate(requests):
            out_rows += [i] * len(r.output_token_ids)
            out_ids += r.output_token_ids
            prompt_rows += [i] * len(r.prompt_token_ids)
            prompt_ids += r.prompt_token_ids
            pending_rows += [i] * len(r.pending_rows)
            pending_sources += r.pending_rows
        out_rows_d, out_ids_d, prompt_rows_d, prompt_ids_d, pending_rows_d, sources_d = \
            self._to_device([out_rows, out_ids, prompt_rows, prompt_ids, pending_rows,
                               pending_sources], torch.long)
        if pending_rows:
            out_rows_d = torch.cat([out_rows_d, pending_rows_d])
            out_ids_d = torch.cat([out_ids_d, self.last_sampled[sources_d]])
        return [out_rows_d, out_ids_d, prompt_rows_d, prompt_ids_d]

    def _to_device(self, parts: list[list[int | float]],
                   dtype: torch.dtype) -> list[torch.Tensor]:
        """Host lists -> device tensors of ``dtype``, in one copy from pinned
        memory that does not wait for the device."""
        host = torch.tensor(list(itertools.chain.from_iterable(parts)), dtype=dtype)
        if self.device.type == "cuda":
            host = host.pin_memory()
        return list(host.to(self.device, non_blocking=True).split([len(p) for p in parts]))

    def fill_pending_tokens(self, input_ids: torch.Tensor, inp: ModelInput) -> None:
        """Put the previous step's sampled tokens into this step's placeholder rows."""
        if inp.pending_rows:
            rows, sources = self._to_device([inp.pending_rows, inp.pending_sources],
                                              torch.long)
            input_ids[rows] = self.last_sampled[sources]

    def _forward(self, inp: ModelInput) -> torch.Tensor:
        if self.lora_manager is not None:
            self.lora_manager.prepare_step(inp.token_lora_ids)
        input_ids, positions, slot_mapping = self._to_device(
            [inp.input_ids, inp.positions, inp.slot_mapping], torch.long)
        self.fill_pending_tokens(input_ids, inp)
        width = max(len(b) for b in inp.block_tables)
        tables = [b + [0] * (width - len(b)) for b in inp.block_tables]
        query_start_loc, seq_lens, block_tables = self._to_device(
            [inp.query_start_loc, inp.seq_lens, list(itertools.chain.from_iterable(tables))],
            torch.int32)
        queries = [inp.query_start_loc[i + 1] - inp.query_start_loc[i]
                   for i in range(len(inp.seq_lens))]
        meta = AttentionMetadata(
            num_seqs=len(inp.seq_lens), num_tokens=len(inp.input_ids),
            query_start_loc=query_start_loc, seq_lens=seq_lens,
            block_tables=block_tables.view(len(tables), width), slot_mapping=slot_mapping,
            max_query_len=max(queries),
            query_start_loc_cpu=inp.query_start_loc, seq_lens_cpu=inp.seq_lens)
        return self.model(input_ids, positions, meta)

    @torch.inference_mode()
    def execute(self, inp: ModelInput, sampling: SamplingMetadata | None,
                is_driver: bool = True) -> PendingSamplerOutput | None:
        """Launch the step. Every rank computes the logits it needs (the LM
        head's gather is collective under tensor parallelism); the driver
        rank samples and returns the result, still on its way to the host."""
        if self.graphs is not None and self.graphs.can_run(inp):
            logits, prompt_logprobs = self.graphs.run(inp), None
        else:
            hidden = self._forward(inp)
            logits = None
            if inp.logits_indices:
                rows = torch.tensor(inp.logits_indices, dtype=torch.long, device=self.device)
                logits = self.model.compute_logits(hidden[rows])
            prompt_logprobs = self._prompt_logprobs(hidden, inp)
        if not is_driver:
            return None
        out = SamplerOutput(torch.empty(0, dtype=torch.long))
        if logits is not None and sampling is not None:
            out = self.sampler(logits, sampling)
            self.last_sampled = out.sampled_token_ids
        out.prompt_logprobs = prompt_logprobs
        return PendingSamplerOutput(out)

    def _prompt_logprobs(self, hidden: torch.Tensor, inp: ModelInput) -> PromptLogprobsOutput | None:
        """Logprobs of each requested prompt token given its prefix: the top
        ``prompt_logprob_top`` entries and the actual token with its rank."""
        if not inp.prompt_logprob_rows:
            return None
        rows = torch.tensor(inp.prompt_logprob_rows, dtype=torch.long, device=self.device)
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[rows]).float(), dim=-1)
        targets = torch.tensor(inp.prompt_logprob_targets, dtype=torch.long, device=self.device)
        chosen = logprobs.gather(1, targets.unsqueeze(1))
        top = logprobs.topk(inp.prompt_logprob_top, dim=-1) if inp.prompt_logprob_top else None
        return PromptLogprobsOutput(
            target_logprobs=chosen.squeeze(1).tolist(),
            target_ranks=((logprobs > chosen).sum(dim=-1) + 1).tolist(),
            top_token_ids=top.indices.tolist() if top is not None else None,
            top_logprobs=top.values.tolist() if top is not None else None)
