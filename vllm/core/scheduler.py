"""Continuous batching: every step, running requests advance first (one
token each for decodes, the next chunk for unfinished prefills), then
waiting requests join while the token budget, the sequence limit, free KV
blocks and the adapter-slot limit allow. Under async scheduling a running
request's newest token may still be on the device; it counts as a token to
compute like any other. When blocks run out, the most
recently admitted running request is preempted and later recomputed."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from vllm.config import SchedulerConfig
from vllm.core.kv_cache import BlockManager
from vllm.core.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 max_loras: int | None = None):
        self.config = config
        self.block_manager = block_manager
        self.max_loras = max_loras
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.block_manager.free(request)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager

        queue = list(self.running)
        while queue and budget > 0:
            request = queue.pop(0)
            if request.num_tokens >= request.max_total_tokens:
                continue  # its last token is still on the device; it ends when that arrives
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            while not bm.allocate(request, request.num_computed_tokens + n):
                victim = queue.pop() if queue else request
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is request:
                    break
            else:
                batch.requests.append(request)
                batch.num_new_tokens.append(n)
                budget -= n

        if batch.preempted:
            return batch  # no admissions while memory is this tight
        active_loras = {r.lora_int_id for r in self.running if r.lora_int_id}
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            lora = request.lora_int_id
            if lora and self.max_loras is not None and lora not in active_loras \
                    and len(active_loras) >= self.max_loras:
                skipped.append(self.waiting.popleft())  # waits for an adapter slot
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not bm.allocate(request, request.num_computed_tokens + n):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if lora:
                active_loras.add(lora)
            batch.requests.append(request)
            batch.num_new_tokens.append(n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return batch
