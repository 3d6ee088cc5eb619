"""Prometheus metrics of a serving engine, with vLLM's metric names.

Everything is recorded on the engine thread from what it already has in
hand (the outputs of each step, the scheduler's queues after it), so the
request path never scans engine state. Counters and histograms are
labelled by ``model_name``: the base model's served name, or the adapter's
name for requests that run with one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)


@dataclass
class _Tracked:
    """What the metrics remember about one unfinished request."""
    model_name: str
    arrival_time: float
    prompt_counted: bool = False
    first_token_seen: bool = False
    # per sample index: tokens already counted and when the last one came
    num_tokens: dict[int, int] = field(default_factory=dict)
    last_token_time: dict[int, float] = field(default_factory=dict)


class EngineMetrics:
    """The engine's Prometheus metrics in ``registry`` (one registry per
    server, so that several servers can live in one process)."""

    def __init__(self, registry: CollectorRegistry, served_model_name: str):
        self.served_model_name = served_model_name
        name = ["model_name"]
        self.request_success = Counter(
            "vllm:request_success", "Finished requests, by finish reason (abort included).",
            name + ["finished_reason"], registry=registry)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefilled prompt tokens.", name,
                                     registry=registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", name,
                                         registry=registry)
        self.num_running = Gauge("vllm:num_requests_running", "Sequences being generated.",
                                 name, registry=registry)
        self.num_waiting = Gauge("vllm:num_requests_waiting", "Sequences waiting to run.",
                                 name, registry=registry)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc",
                              "Fraction of KV-cache blocks in use (1 = full).", name,
                              registry=registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Time from arrival to the first generated token.", name,
                              buckets=_TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("vllm:inter_token_latency_seconds",
                             "Time between consecutive generated tokens of a sequence.", name,
                             buckets=_ITL_BUCKETS, registry=registry)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "Time from arrival to the end of a finished request.", name,
                             buckets=_E2E_BUCKETS, registry=registry)
        self._live: dict[str, _Tracked] = {}

    def _model_name(self, lora_request: LoRARequest | None) -> str:
        return lora_request.lora_name if lora_request is not None else self.served_model_name

    def request_added(self, request_id: str, lora_request: LoRARequest | None,
                      arrival_time: float) -> None:
        self._live[request_id] = _Tracked(self._model_name(lora_request), arrival_time)

    def request_outputs(self, outputs: list[RequestOutput], now: float) -> None:
        for out in outputs:
            tracked = self._live.get(out.request_id)
            if tracked is None:
                continue
            model = tracked.model_name
            if not tracked.prompt_counted:
                # outputs appear once the prompt is prefilled
                self.prompt_tokens.labels(model).inc(len(out.prompt_token_ids))
                tracked.prompt_counted = True
            for completion in out.outputs:
                before = tracked.num_tokens.get(completion.index, 0)
                new = len(completion.token_ids) - before
                if new <= 0:
                    continue
                self.generation_tokens.labels(model).inc(new)
                if not tracked.first_token_seen:
                    self.ttft.labels(model).observe(now - tracked.arrival_time)
                    tracked.first_token_seen = True
                last = tracked.last_token_time.get(completion.index)
                if last is not None:
                    for _ in range(new):
                        self.itl.labels(model).observe((now - last) / new)
                tracked.num_tokens[completion.index] = before + new
                tracked.last_token_time[completion.index] = now
            if out.finished:
                del self._live[out.request_id]
                reason = out.outputs[0].finish_reason if out.outputs else None
                self.request_success.labels(model, reason or "stop").inc()
                self.e2e.labels(model).observe(now - tracked.arrival_time)

    def request_aborted(self, request_id: str) -> None:
        tracked = self._live.pop(request_id, None)
        if tracked is not None:
            self.request_success.labels(tracked.model_name, "abort").inc()

    def scheduler_state(self, num_running: int, num_waiting: int, kv_usage: float) -> None:
        model = self.served_model_name
        self.num_running.labels(model).set(num_running)
        self.num_waiting.labels(model).set(num_waiting)
        self.kv_usage.labels(model).set(kv_usage)
