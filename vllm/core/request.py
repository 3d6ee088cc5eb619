"""A request's state as it moves through the engine."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm.lora.request import LoRARequest
from vllm.outputs import Logprob
from vllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    """One sequence being generated. ``num_computed_tokens`` counts the
    tokens whose keys and values sit in the KV cache; preemption resets it
    to zero and the sequence is recomputed from its prompt and outputs.

    Under async scheduling a step is scheduled before the previous step's
    tokens reach the host: ``pending_rows`` holds, per token sampled on the
    device but not yet seen here, its row in its step's sampler output.
    Those tokens count in ``num_tokens`` (the scheduler plans with them) but
    are not in ``output_token_ids`` yet."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    lora_request: LoRARequest | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    cumulative_logprob: float = 0.0
    output_text: str = ""
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    detokenizer: Any = None
    # for the n samples of one parent request: its id and this sample's index
    parent_id: str | None = None
    index: int = 0
    pending_rows: list[int] = field(default_factory=list)
    # prompt + generated tokens after which the request ends on length
    max_total_tokens: int = 1 << 62

    def __post_init__(self) -> None:
        if self.sampling_params.logprobs is not None:
            self.logprobs = []
        if self.sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has no prefix

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + len(self.pending_rows)

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host has (``num_tokens`` less the pending)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.output_token_ids) + len(self.pending_rows)

    def prompt_logprob_span(self, start: int, num_new_tokens: int) -> range:
        """Positions p of the chunk [start, start + num_new_tokens) whose next
        prompt token's logprob is wanted (empty when prompt_logprobs is off
        or the chunk is past the prompt)."""
        if self.sampling_params.prompt_logprobs is None:
            return range(0)
        return range(start, max(start, min(start + num_new_tokens,
                                           len(self.prompt_token_ids) - 1)))

    @property
    def lora_int_id(self) -> int:
        return self.lora_request.lora_int_id if self.lora_request else 0

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None
