"""Token sampling for one step of a batch.

Order: logprobs of the raw logits (what users get back, as upstream) ->
min_tokens masking -> repetition / frequency / presence penalties -> greedy
rows take the argmax; random rows: temperature -> min_p -> top_k -> top_p,
then one exponential race ``argmax(p / q), q ~ Exp(1)``, whose draws come
from the request's own generator when it has a seed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor          # [N] float32; 0 for greedy rows
    top_p: torch.Tensor                # [N] float32
    top_k: torch.Tensor                # [N] int64; 0 = off
    min_p: torch.Tensor                # [N] float32
    presence_penalty: torch.Tensor     # [N]
    frequency_penalty: torch.Tensor    # [N]
    repetition_penalty: torch.Tensor   # [N]
    generators: dict[int, torch.Generator]
    # penalties (None without): (row, token id) pairs of every generated
    # token, repeats included, and of every prompt token
    penalty_output_rows: torch.Tensor | None
    penalty_output_ids: torch.Tensor | None
    penalty_prompt_rows: torch.Tensor | None
    penalty_prompt_ids: torch.Tensor | None
    # rows sampled at random (temperature > 0): host list and device copy
    random_rows: list[int]
    random_rows_device: torch.Tensor | None
    # (row, token id) pairs to suppress: stop tokens of rows under min_tokens
    blocked_rows: torch.Tensor | None
    blocked_token_ids: torch.Tensor | None
    max_num_logprobs: int | None       # largest `logprobs` in the batch, None if nobody asked
    no_penalties: bool


@dataclass
class PromptLogprobsOutput:
    """Per requested prompt position (in batch order): the logprob and rank
    of the actual next prompt token, and the top-N candidates."""
    target_logprobs: list[float]
    target_ranks: list[int]
    top_token_ids: list[list[int]] | None
    top_logprobs: list[list[float]] | None


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor                 # [N] int64
    # per row: top-N ids and logprobs, the sampled token's logprob and rank
    logprob_token_ids: torch.Tensor | None = None   # [N, max_num_logprobs]
    logprob_values: torch.Tensor | None = None      # [N, max_num_logprobs]
    sampled_logprobs: torch.Tensor | None = None    # [N]
    sampled_ranks: torch.Tensor | None = None       # [N]
    prompt_logprobs: PromptLogprobsOutput | None = None


_DEVICE_FIELDS = ("sampled_token_ids", "logprob_token_ids", "logprob_values",
                  "sampled_logprobs", "sampled_ranks")


class PendingSamplerOutput:
    """A step's sampler output on its way to the host. The device-to-host
    copies queue behind the step and ``result`` waits for them alone, so the
    host can schedule and launch the next step in the meantime."""

    def __init__(self, out: SamplerOutput):
        copies = {}
        for name in _DEVICE_FIELDS:
            t = getattr(out, name)
            if t is not None and t.is_cuda:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                copies[name] = host.copy_(t, non_blocking=True)
        self._done: torch.cuda.Event | None = None
        if copies:
            self._done = torch.cuda.Event()
            self._done.record()
        self._out = dataclasses.replace(out, **copies)

    def result(self) -> SamplerOutput:
        """The output with every tensor on the host (waits for the step)."""
        if self._done is not None:
            self._done.synchronize()
        return self._out


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    N, V = logits.shape
    device = logits.device
    out_rows, out_ids = meta.penalty_output_rows, meta.penalty_output_ids
    out_counts = torch.zeros(N, V, device=device)
    out_counts.index_put_((out_rows, out_ids), torch.ones(out_ids.shape, device=device),
                          accumulate=True)
    seen = torch.zeros(N, V, dtype=torch.bool, device=device)
    seen[meta.penalty_prompt_rows, meta.penalty_prompt_ids] = True
    seen[out_rows, out_ids] = True
    rep = meta.repetition_penalty.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - meta.frequency_penalty.unsqueeze(1) * out_counts
    logits = logits - meta.presence_penalty.unsqueeze(1) * (out_counts > 0).float()
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                            min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside min_p, top_k and top_p, in that order."""
    probs = torch.softmax(logits, dim=-1)
    max_p = probs.max(dim=-1, keepdim=True).values
    logits = logits.masked_fill(probs < min_p.unsqueeze(1) * max_p, float("-inf"))
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    V = logits.shape[1]
    positions = torch.arange(V, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, V).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(positions >= k, float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # keep the smallest prefix whose mass reaches top_p (the top token always stays)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p.unsqueeze(1),
                                              float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


class Sampler:
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = None
        if meta.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        # every index below was built on the host: no step here waits for the device
        if meta.blocked_rows is not None:
            logits[meta.blocked_rows, meta.blocked_token_ids] = float("-inf")
        if not meta.no_penalties:
            logits = apply_penalties(logits, meta)
        sampled = logits.argmax(dim=-1)
        if meta.random_rows:
            sampled[meta.random_rows_device] = _sample_rows(logits, meta)
        out = SamplerOutput(sampled)
        if raw_logprobs is not None:
            n = meta.max_num_logprobs
            if n > 0:
                top = raw_logprobs.topk(n, dim=-1)
                out.logprob_values, out.logprob_token_ids = top.values, top.indices
            chosen = raw_logprobs.gather(1, sampled.unsqueeze(1))
            out.sampled_logprobs = chosen.squeeze(1)
            out.sampled_ranks = (raw_logprobs > chosen).sum(dim=-1) + 1
        return out


def _sample_rows(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    rows = meta.random_rows_device
    scaled = logits[rows] / meta.temperature[rows].unsqueeze(1)
    masked = apply_top_k_top_p_min_p(scaled, meta.top_k[rows], meta.top_p[rows], meta.min_p[rows])
    probs = torch.softmax(masked, dim=-1)
    q = torch.empty_like(probs).exponential_()
    for j, row in enumerate(meta.random_rows):
        if row in meta.generators:
            q[j].exponential_(generator=meta.generators[row])
    return (probs / q).argmax(dim=-1)
