"""The engine step loop: schedule -> run -> process outputs."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vllm.config import VllmConfig, load_generation_config
from vllm.core.kv_cache import BlockManager
from vllm.core.request import Request, RequestStatus
from vllm.core.scheduler import ScheduledBatch, Scheduler
from vllm.engine.detokenizer import IncrementalDetokenizer, token_text
from vllm.logger import init_logger
from vllm.lora.request import LoRARequest
from vllm.model_executor.layers.sampler import PendingSamplerOutput, PromptLogprobsOutput
from vllm.outputs import CompletionOutput, Logprob, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.worker.model_runner import ModelRunner

if TYPE_CHECKING:
    from vllm.executor.base import Executor

logger = init_logger(__name__)

PromptType = str | list[int] | dict[str, Any]


def make_executor(config: VllmConfig, progress: bool) -> "Executor":
    """One process for a single rank; otherwise the configured backend."""
    from vllm.executor.base import UniprocExecutor
    parallel = config.parallel_config
    if parallel.world_size == 1:
        return UniprocExecutor(ModelRunner(config, progress=progress))
    backend = parallel.distributed_executor_backend or "mp"
    if backend == "ray":
        from vllm.executor.ray_executor import RayExecutor
        return RayExecutor(config, progress)
    from vllm.executor.multiproc import MultiprocExecutor
    return MultiprocExecutor(config, progress)


class InvalidRequestError(ValueError):
    """A request the engine refuses (bad prompt, bad parameters)."""


@dataclass
class LaunchedStep:
    """A step sent to the device whose outputs the host has not taken yet."""
    batch: ScheduledBatch
    starts: list[int]           # each request's num_computed_tokens before the step
    sampled: list[Request]      # requests that get a token, in sampler-row order
    output: PendingSamplerOutput


@dataclass
class ParentRequest:
    """A request with n > 1 samples, run as n child requests."""
    request_id: str
    children: list[Request] = field(default_factory=list)


class LLMEngine:
    def __init__(self, config: VllmConfig, progress: bool = True):
        from transformers import AutoTokenizer

        self.config = config
        mc = config.model_config
        self.tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer)
        self.eos_token_ids = self._eos_token_ids(mc.model)
        torch.manual_seed(mc.seed)
        self.executor = make_executor(config, progress)
        self.runner = self.executor.driver  # rank 0: prepares inputs, samples
        num_blocks = self.executor.initialize_cache()
        config.cache_config.num_blocks = num_blocks
        self.block_manager = BlockManager(num_blocks, config.cache_config.block_size)
        lora = config.lora_config
        self.scheduler = Scheduler(config.scheduler_config, self.block_manager,
                                   lora.max_loras if lora else None)
        self.requests: dict[str, Request] = {}
        self.parents: dict[str, ParentRequest] = {}
        self._in_flight: LaunchedStep | None = None
        logger.info("engine ready: %s on %s, dtype %s, %d KV blocks of %d tokens",
                    mc.architecture, config.device_config.device, mc.dtype, num_blocks,
                    config.cache_config.block_size)

    def shutdown(self) -> None:
        """Stop worker processes (if any). The engine is unusable afterwards."""
        self.executor.shutdown()

    @classmethod
    def from_engine_args(cls, engine_args: Any, progress: bool = True) -> "LLMEngine":
        return cls(engine_args.create_engine_config(), progress=progress)

    def _eos_token_ids(self, model_dir: str) -> set[int]:
        eos = load_generation_config(model_dir).get("eos_token_id")
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, list) else {eos}

    # -- requests -----------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        return None, list(prompt)

    def validate_request(self, token_ids: list[int], params: SamplingParams) -> None:
        """Refuse, with a clear message, anything that could not run: the
        engine loop must never meet an input it cannot process."""
        mc = self.config.model_config
        bad_stops = [t for t in params.stop_token_ids if not 0 <= t < mc.vocab_size]
        if bad_stops:
            raise InvalidRequestError(f"stop_token_ids: {bad_stops[0]} is outside the "
                                      f"vocabulary (size {mc.vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > mc.max_logprobs:
                raise InvalidRequestError(f"{name}={value} is above the maximum "
                                          f"{mc.max_logprobs} (--max-logprobs)")
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        vocab = mc.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary "
                                      f"(size {vocab})")
        if len(token_ids) >= mc.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens, but the model's context length "
                f"(max_model_len) is {mc.max_model_len}; it must leave room for at least one "
                "generated token")
        longest = min(len(token_ids) + (params.max_tokens or mc.max_model_len), mc.max_model_len)
        if self.block_manager.blocks_for(longest) > self.block_manager.num_blocks:
            raise InvalidRequestError(
                f"a request of up to {longest} tokens needs "
                f"{self.block_manager.blocks_for(longest)} KV-cache blocks but the cache has only "
                f"{self.block_manager.num_blocks}; lower max_tokens or give the cache more memory")

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    lora_request: LoRARequest | None = None,
                    arrival_time: float | None = None) -> None:
        if request_id in self.requests or request_id in self.parents:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        text, token_ids = self.tokenize_prompt(prompt)
        self.validate_request(token_ids, params)
        if lora_request is not None:
            self.add_lora(lora_request)
        params = self._with_stop_ids(params)
        max_len = self.config.model_config.max_model_len
        max_total = min(len(token_ids) + (params.max_tokens or max_len), max_len)
        children = [params] if params.n == 1 else [params.clone_for_child(i)
                                                    for i in range(params.n)]
        parent = ParentRequest(request_id) if params.n > 1 else None
        for i, child_params in enumerate(children):
            rid = request_id if parent is None else f"{i}_{request_id}"
            request = Request(rid, text, token_ids, child_params, lora_request,
                              arrival_time or time.monotonic(),
                              parent_id=request_id if parent is not None else None, index=i,
                              max_total_tokens=max_total)
            request.detokenizer = IncrementalDetokenizer(
                self.tokenizer, token_ids, child_params.skip_special_tokens,
                child_params.spaces_between_special_tokens)
            if child_params.seed is not None:
                request.generator = torch.Generator(device=self.runner.device)
                request.generator.manual_seed(child_params.seed)
            self.requests[rid] = request
            if parent is not None:
                parent.children.append(request)
            self.scheduler.add_request(request)
        if parent is not None:
            self.parents[request_id] = parent

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Read and validate an adapter now (it is cached on the CPU), so that
        a bad adapter fails its request instead of a later step."""
        if self.config.lora_config is None:
            raise InvalidRequestError("a LoRA adapter was requested but LoRA is not enabled "
                                      "(start the engine with enable_lora=True)")
        self.executor.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        in_use = [r for r in self.requests.values() if r.lora_int_id == lora_int_id]
        if in_use:
            raise InvalidRequestError(f"adapter {lora_int_id} is in use by "
                                      f"{len(in_use)} unfinished request(s)")
        return self.executor.remove_lora(lora_int_id)

    def _with_stop_ids(self, params: SamplingParams) -> SamplingParams:
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops |= self.eos_token_ids
        params.all_stop_token_ids = stops
        return params

    def abort_request(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else request_ids
        for rid in ids:
            parent = self.parents.pop(rid, None)
            targets = parent.children if parent else [self.requests.get(rid)]
            for request in targets:
                if request is not None and not request.status.finished:
                    self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
                if request is not None:
                    self.requests.pop(request.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    # -- the step -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step, then process the outputs of the step
        before it (async scheduling: the device runs the new step meanwhile)
        or of this one."""
        outputs: list[RequestOutput] = []
        previous, self._in_flight = self._in_flight, self._launch()
        if previous is not None:
            outputs += self._complete(previous)
        if not self.config.scheduler_config.async_scheduling and self._in_flight is not None:
            outputs += self._complete(self._in_flight)
            self._in_flight = None
        return outputs

    def _launch(self) -> LaunchedStep | None:
        batch = self.scheduler.schedule()
        if not batch.requests:
            return None
        model_input = self.runner.prepare_inputs(batch)
        starts = [r.num_computed_tokens for r in batch.requests]
        sampled = [r for r, n in zip(batch.requests, batch.num_new_tokens)
                   if r.num_computed_tokens + n == r.num_tokens]
        sampling = self.runner.sampling_metadata(sampled) if sampled else None
        output = self.executor.execute(model_input, sampling)
        for request, n in zip(batch.requests, batch.num_new_tokens):
            request.num_computed_tokens += n
        for row, request in enumerate(sampled):
            request.pending_rows.append(row)
        return LaunchedStep(batch, starts, sampled, output)

    def _complete(self, step: LaunchedStep) -> list[RequestOutput]:
        """Take a launched step's outputs into its requests (waits for the device)."""
        result = step.output.result()
        if result.prompt_logprobs is not None:
            self._add_prompt_logprobs(step, result.prompt_logprobs)
        tokens = result.sampled_token_ids.tolist()
        now = time.monotonic()
        updated: list[Request] = []
        for row, request in enumerate(step.sampled):
            if request.status.finished:
                continue  # stopped or aborted while this step ran: its token is dropped
            request.pending_rows.pop(0)
            token = tokens[row]
            request.output_token_ids.append(token)
            if request.first_token_time is None:
                request.first_token_time = now
            request.last_token_time = now
            if request.logprobs is not None:
                request.logprobs.append(self._logprob_entry(result, row, token,
                                                            request.sampling_params.logprobs))
                request.cumulative_logprob += float(result.sampled_logprobs[row])
            previous_length = len(request.output_text)
            request.output_text += request.detokenizer.decode_token(token)
            status = self._stop_status(request, token, previous_length)
            if status is RequestStatus.FINISHED_LENGTH:
                request.output_text += request.detokenizer.flush()
            if status is not None:
                self.scheduler.finish(request, status)
            updated.append(request)
        return self._outputs(updated)

    def _add_prompt_logprobs(self, step: LaunchedStep, out: PromptLogprobsOutput) -> None:
        """Append a step's prompt logprobs to their requests; rows come in
        the order ModelRunner.prepare_inputs laid them out."""
        row = 0
        for request, start, n in zip(step.batch.requests, step.starts, step.batch.num_new_tokens):
            want = request.sampling_params.prompt_logprobs
            for pos in request.prompt_logprob_span(start, n):
                entry: dict[int, Logprob] = {}
                if out.top_token_ids is not None:
                    pairs = zip(out.top_token_ids[row][:want], out.top_logprobs[row][:want])
                    for rank, (tid, value) in enumerate(pairs, start=1):
                        entry[tid] = Logprob(value, rank, token_text(self.tokenizer, tid))
                target = request.prompt_token_ids[pos + 1]
                if target not in entry:
                    entry[target] = Logprob(out.target_logprobs[row], out.target_ranks[row],
                                            token_text(self.tokenizer, target))
                # a preempted request recomputes its prompt: keep the first result
                if len(request.prompt_logprobs) == pos + 1:
                    request.prompt_logprobs.append(entry)
                row += 1

    def _logprob_entry(self, result, row: int, token: int, n: int) -> dict[int, Logprob]:
        entry: dict[int, Logprob] = {}
        if n:
            ids = result.logprob_token_ids[row, :n].tolist()
            values = result.logprob_values[row, :n].tolist()
            for rank, (tid, value) in enumerate(zip(ids, values), start=1):
                entry[tid] = Logprob(value, rank, token_text(self.tokenizer, tid))
        if token not in entry:
            entry[token] = Logprob(float(result.sampled_logprobs[row]),
                                   int(result.sampled_ranks[row]),
                                   token_text(self.tokenizer, token))
        return entry

    def _stop_status(self, request: Request, token: int,
                     previous_length: int) -> RequestStatus | None:
        params = request.sampling_params
        generated = len(request.output_token_ids)
        if generated >= params.min_tokens:
            if token in params.all_stop_token_ids:
                if token in params.stop_token_ids:
                    request.stop_reason = token
                if not params.include_stop_str_in_output:
                    request.output_text = request.output_text[:previous_length]
                return RequestStatus.FINISHED_STOPPED
            for stop in params.stop:
                # a new match must end inside the text this token added
                at = request.output_text.find(stop, max(previous_length - len(stop) + 1, 0))
                if at >= 0:
                    end = at + len(stop) if params.include_stop_str_in_output else at
                    request.output_text = request.output_text[:end]
                    request.stop_reason = stop
                    return RequestStatus.FINISHED_STOPPED
        if request.num_known_tokens >= request.max_total_tokens:  # max_tokens or max_model_len
            return RequestStatus.FINISHED_LENGTH
        return None

    def _completion(self, request: Request) -> CompletionOutput:
        logprobs = request.logprobs
        return CompletionOutput(
            index=request.index, text=request.output_text,
            token_ids=list(request.output_token_ids),
            cumulative_logprob=request.cumulative_logprob if logprobs is not None else None,
            logprobs=list(logprobs) if logprobs is not None else None,
            finish_reason=request.finish_reason, stop_reason=request.stop_reason,
            lora_request=request.lora_request)

    def _outputs(self, updated: list[Request]) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        reported: set[str] = set()
        for request in updated:
            rid = request.parent_id or request.request_id
            if rid in reported:
                continue
            reported.add(rid)
            members = self.parents[rid].children if request.parent_id else [request]
            finished = all(m.status.finished for m in members)
            if not finished and request.sampling_params.output_kind is RequestOutputKind.FINAL_ONLY:
                continue
            outputs.append(self._request_output(rid, members, finished))
            if finished:
                self.parents.pop(rid, None)
                for m in members:
                    self.requests.pop(m.request_id, None)
        return outputs

    def _request_output(self, request_id: str, members: list[Request],
                        finished: bool) -> RequestOutput:
        first = members[0]
        return RequestOutput(
            request_id=request_id, prompt=first.prompt, prompt_token_ids=first.prompt_token_ids,
            prompt_logprobs=first.prompt_logprobs,
            outputs=[self._completion(r) for r in members],
            finished=finished, lora_request=first.lora_request,
            metrics={"arrival_time": first.arrival_time,
                     "first_token_time": first.first_token_time,
                     "num_preemptions": sum(r.num_preemptions for r in members)})
