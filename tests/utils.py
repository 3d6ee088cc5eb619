"""Shared test helpers: tiny checkpoints, HF references, parity checks."""
from __future__ import annotations

import functools
import os

import torch

from vllm.model_executor.layers.attention.backend import AttentionMetadata
from vllm.tools.make_tiny_model import make_tiny_model

ARCHS = ["qwen3_moe", "mixtral", "qwen2_moe", "olmoe"]

PROMPTS = [
    "hello world",
    "The quick brown fox jumps",
    "café naïve 日本語",
    "Serving engines batch requests continuously: new prompts join while others decode",
    "def add(a, b):",
    "a",
    "Numbers: 0 1 2 3 4 5",
    "Unicode: 😀🚀 and more text to make this one a little longer than the rest of them",
]

# Greedy near-ties: two logits closer than this may legitimately swap
# between two float32 implementations that sum in different orders.
TIE_TOLERANCE = 1e-4


def model_dir(root: str, arch: str, **overrides) -> str:
    path = os.path.join(root, arch + "".join(f"-{k}={v}" for k, v in sorted(overrides.items())))
    if not os.path.isfile(os.path.join(path, "config.json")):
        make_tiny_model(arch, path, **overrides)
    return path


@functools.lru_cache(maxsize=8)
def hf_model(path: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logits(path: str, token_ids: list[int]) -> torch.Tensor:
    return hf_model(path)(torch.tensor([token_ids])).logits[0].float()


def assert_greedy_consistent(path_or_model, prompt_ids: list[int], output_ids: list[int],
                             logprobs=None, logprob_tol: float = 1e-3) -> None:
    """Our greedy tokens must be the reference's argmax at every step given
    the same prefix (teacher forcing), except where the top logits are
    within TIE_TOLERANCE of each other. With ``logprobs`` (vLLM Logprob
    dicts), each reported value must match the reference log-softmax."""
    ids = prompt_ids + output_ids
    if isinstance(path_or_model, str):
        logits = hf_logits(path_or_model, ids)
    else:
        with torch.no_grad():
            logits = path_or_model(torch.tensor([ids])).logits[0].float()
    logits = logits[len(prompt_ids) - 1:-1]
    if logprobs is not None:
        ref = torch.log_softmax(logits, dim=-1)
        for step, entry in enumerate(logprobs):
            for tid, lp in entry.items():
                assert abs(lp.logprob - ref[step, tid].item()) < logprob_tol, (
                    f"step {step} token {tid}: logprob {lp.logprob} vs {ref[step, tid].item()}")
    for step, (row, token) in enumerate(zip(logits, output_ids)):
        best = row.max().item()
        gap = best - row[token].item()
        assert gap <= TIE_TOLERANCE, (
            f"step {step}: token {token} has logit {row[token].item():.6f}, "
            f"HF argmax {row.argmax().item()} has {best:.6f}")


@torch.no_grad()
def engine_prefill_logits(llm, token_ids: list[int]) -> torch.Tensor:
    """Logits of every position of one sequence, run through the engine's
    model and paged attention (blocks 0..n of the idle engine's cache)."""
    runner = llm.llm_engine.runner
    bs = runner.block_size
    n = len(token_ids)
    blocks = list(range(-(-n // bs)))
    dev = runner.device
    meta = AttentionMetadata(
        num_seqs=1, num_tokens=n, query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
        block_tables=torch.tensor([blocks], dtype=torch.int32, device=dev),
        slot_mapping=torch.arange(n, device=dev), max_query_len=n,
        query_start_loc_cpu=[0, n], seq_lens_cpu=[n])
    hidden = runner.model(torch.tensor(token_ids, device=dev), torch.arange(n, device=dev), meta)
    return runner.model.compute_logits(hidden).float().cpu()


def relative_max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()
