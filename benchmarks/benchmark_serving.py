"""Online serving benchmark: load a running ``vllm serve`` with streamed
completions spread over the base model and LoRA adapters.

    vllm serve MODEL --enable-lora --max-loras 2 --lora-modules a=PATH b=PATH c=PATH &
    python benchmarks/benchmark_serving.py --base-url http://127.0.0.1:8000 \
        --adapters a,b,c --base-fraction 0.25 --num-prompts 200 --request-rate 8 \
        --input-len 128 --output-len 128

Prompts are random token ids of exactly ``--input-len`` tokens (drawn from
the tokenizer of the served model, found through /v1/models, or
``--tokenizer``); every request generates exactly ``--output-len`` tokens
(``ignore_eos``). Requests arrive as a Poisson process of ``--request-rate``
per second (``inf``: all at once), at most ``--max-concurrency`` in flight.
Prints request and token throughput and TTFT / TPOT / ITL / E2E latency
statistics (mean, p50, p90, p99) as a table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import openai


@dataclass
class RequestResult:
    model: str
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    # gaps between consecutive streamed chunks
    itl: list[float] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY") or "none")
    p.add_argument("--model", default=None,
                   help="base model name (default: the first model /v1/models lists)")
    p.add_argument("--adapters", default="",
                   help="comma-separated adapter names to mix in (as served)")
    p.add_argument("--base-fraction", type=float, default=None,
                   help="fraction of requests for the base model (default: an equal share "
                        "with each adapter)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (default: the base model's root from /v1/models)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals; inf sends all at once")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at most")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", default=None, help="also write the summary here")
    return p.parse_args(argv)


def pick_models(base: str, adapters: list[str], base_fraction: float | None, n: int,
                rng: random.Random) -> list[str]:
    if not adapters:
        return [base] * n
    if base_fraction is None:
        base_fraction = 1.0 / (len(adapters) + 1)
    if not 0.0 <= base_fraction <= 1.0:
        raise SystemExit(f"--base-fraction must be in [0, 1], got {base_fraction}")
    return [base if rng.random() < base_fraction else rng.choice(adapters) for _ in range(n)]


def random_prompts(tokenizer_path: str, n: int, length: int, rng: random.Random
                   ) -> list[list[int]]:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    return [[rng.choice(ids) for _ in range(length)] for _ in range(n)]


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: list[int],
                      output_len: int) -> RequestResult:
    result = RequestResult(model)
    start = last = time.perf_counter()
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=output_len, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].text:
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
            if chunk.usage is not None:
                result.output_tokens = chunk.usage.completion_tokens
        result.latency = time.perf_counter() - start
        result.ok = True
    except openai.OpenAIError as e:
        result.error = str(e)
    return result


def _stats(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"),
                "p99": float("nan")}
    a = np.asarray(values) * scale
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}


def summarize(results: list[RequestResult], duration: float, input_len: int) -> dict:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    per_model: dict[str, int] = {}
    for r in done:
        per_model[r.model] = per_model.get(r.model, 0) + 1
    return {
        "completed": len(done), "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration, "requests_per_model": per_model,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (output_tokens + input_len * len(done)) / duration,
        "ttft_ms": _stats([r.ttft for r in done]), "tpot_ms": _stats(tpot),
        "itl_ms": _stats([x for r in done for x in r.itl]),
        "e2e_ms": _stats([r.latency for r in done]),
    }


def format_table(summary: dict) -> str:
    lines = [f"{'Successful requests':<34}{summary['completed']:>12}",
             f"{'Failed requests':<34}{summary['failed']:>12}",
             f"{'Benchmark duration (s)':<34}{summary['duration_s']:>12.2f}",
             f"{'Request throughput (req/s)':<34}{summary['request_throughput']:>12.2f}",
             f"{'Output token throughput (tok/s)':<34}{summary['output_throughput']:>12.2f}",
             f"{'Total token throughput (tok/s)':<34}{summary['total_token_throughput']:>12.2f}",
             "", f"{'latency (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                       ("e2e_ms", "E2E")):
        s = summary[key]
        lines.append(f"{label:<14}{s['mean']:>10.2f}{s['p50']:>10.2f}{s['p90']:>10.2f}"
                     f"{s['p99']:>10.2f}")
    lines += ["", "requests per model: " + ", ".join(
        f"{m}={n}" for m, n in sorted(summary["requests_per_model"].items()))]
    if summary["errors"]:
        lines.append("errors: " + "; ".join(summary["errors"]))
    return "\n".join(lines)


async def run_benchmark(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    async with openai.AsyncOpenAI(base_url=args.base_url.rstrip("/") + "/v1",
                                  api_key=args.api_key, max_retries=0,
                                  timeout=600.0) as client:
        cards = (await client.models.list()).data
        base_card = next((c for c in cards if c.id == args.model), None) if args.model else \
            next((c for c in cards if getattr(c, "parent", None) is None), cards[0])
        if base_card is None:
            raise SystemExit(f"the server does not serve {args.model!r}")
        adapters = [a for a in args.adapters.split(",") if a]
        missing = set(adapters) - {c.id for c in cards}
        if missing:
            raise SystemExit(f"the server does not serve adapter(s) {sorted(missing)}")
        tokenizer = args.tokenizer or getattr(base_card, "root", None)
        if not tokenizer or not os.path.isdir(tokenizer):
            raise SystemExit("cannot find the tokenizer: pass --tokenizer")
        prompts = random_prompts(tokenizer, args.num_prompts, args.input_len, rng)
        models = pick_models(base_card.id, adapters, args.base_fraction, args.num_prompts, rng)
        limit = asyncio.Semaphore(args.max_concurrency or args.num_prompts)

        async def limited(model: str, prompt: list[int]) -> RequestResult:
            async with limit:
                return await one_request(client, model, prompt, args.output_len)

        tasks = []
        start = time.perf_counter()
        for model, prompt in zip(models, prompts):
            tasks.append(asyncio.create_task(limited(model, prompt)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(results, duration, args.input_len)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    summary = asyncio.run(run_benchmark(args))
    print(format_table(summary))
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
