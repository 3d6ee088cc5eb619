"""``vllm serve`` end to end through the official openai client: outputs
equal the offline LLM's, streaming equals non-streaming, logprobs, runtime
adapters, errors, API keys, concurrency, client disconnects and metrics.

One server (module-scoped) serves every test: three adapters through two
adapter slots, an API key, and runtime adapter loading enabled."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import time

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.entrypoints.conftest import API_KEY, ENGINE_FLAGS, MAX_MODEL_LEN, ROOT, RemoteServer
from tests.utils import PROMPTS
from vllm import SamplingParams
from vllm.version import __version__

BASE = "tiny-moe"
MODELS = [BASE, "a0", "a1", "a2"]
MESSAGES = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "The quick brown fox jumps"}]
LOGPROB_TOL = 1e-3


@pytest.fixture(scope="module")
def server(model_path, adapters):
    a2 = json.dumps({"name": "a2", "path": adapters["a2"], "base_model_name": BASE})
    remote = RemoteServer(
        [model_path, *ENGINE_FLAGS, "--served-model-name", BASE, "--api-key", API_KEY,
         "--lora-modules", f"a0={adapters['a0']}", f"a1={adapters['a1']}", a2],
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}, api_key=API_KEY)
    yield remote
    remote.close()


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    with httpx2.Client(base_url=server.url, headers=server.headers(), timeout=60) as c:
        yield c


def lora_of(lora_requests, model: str):
    return None if model == BASE else lora_requests[model]


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def metrics_text(server: RemoteServer) -> str:
    return httpx2.get(server.url + "/metrics", timeout=10).text


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def stream_completion_text(client, **kw) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in client.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    return texts


def stream_chat_text(client, **kw) -> tuple[dict[int, str], dict[int, str]]:
    """Text and first-delta role of each choice."""
    texts: dict[int, str] = {}
    roles: dict[int, str] = {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        assert chunk.object == "chat.completion.chunk"
        for choice in chunk.choices:
            if choice.index not in texts:
                roles[choice.index] = choice.delta.role
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    return texts, roles


# -- basics ----------------------------------------------------------------------------

def test_health_version_and_models(server, client, model_path, adapters):
    assert httpx2.get(server.url + "/health").status_code == 200
    assert httpx2.get(server.url + "/version").json() == {"version": __version__}
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == set(MODELS)
    assert cards[BASE].root == model_path and cards[BASE].parent is None
    for name in ("a0", "a1", "a2"):
        assert cards[name].parent == BASE
        assert cards[name].root == adapters[name]
        assert cards[name].max_model_len == MAX_MODEL_LEN


@pytest.mark.parametrize("model", MODELS)
def test_outputs_equal_offline(client, offline, lora_requests, model):
    lora = lora_of(lora_requests, model)
    prompts = PROMPTS[:3]
    ref = offline.generate(prompts, greedy(), lora_request=lora, use_tqdm=False)
    out = client.completions.create(model=model, prompt=prompts, max_tokens=12, temperature=0)
    assert out.object == "text_completion"
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [r.outputs[0].text for r in ref]
    assert out.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in ref)
    assert out.usage.completion_tokens == sum(len(r.outputs[0].token_ids) for r in ref)
    # token-id prompts give the same result
    ids = [r.prompt_token_ids for r in ref]
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=12, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in out.choices]

    chat_ref = offline.chat(MESSAGES, greedy(), lora_request=lora, use_tqdm=False)[0]
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12,
                                          temperature=0)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == chat_ref.outputs[0].text
    assert chat.choices[0].finish_reason == chat_ref.outputs[0].finish_reason
    assert chat.usage.prompt_tokens == len(chat_ref.prompt_token_ids)
    # max_completion_tokens is the newer spelling of max_tokens
    newer = client.chat.completions.create(model=model, messages=MESSAGES,
                                           max_completion_tokens=12, temperature=0)
    assert newer.choices[0].message.content == chat_ref.outputs[0].text


# -- streaming --------------------------------------------------------------------------

def _straddling_stop(tokens: list[str]) -> str:
    """A two-character stop string whose first occurrence spans two tokens,
    so that the first character is streamed before the stop can be seen."""
    text = "".join(tokens)
    end = 0
    for a, b in zip(tokens, tokens[1:]):
        end += len(a)
        if a and b and "\ufffd" not in a + b:
            stop = a[-1] + b[0]
            if text.find(stop) == end - 1:
                return stop
    pytest.fail(f"no stop string spans two tokens of {tokens}")


@pytest.mark.parametrize("use_stop", [False, True], ids=["no-stop", "stop"])
def test_streamed_completion_equals_non_streamed(client, offline, lora_requests, use_stop):
    kw = dict(model="a1", prompt=PROMPTS[1], max_tokens=24, temperature=0)
    if use_stop:
        tokens = client.completions.create(**kw, logprobs=0).choices[0].logprobs.tokens
        kw["stop"] = [_straddling_stop(tokens), "\x00never"]
    whole = client.completions.create(**kw).choices[0]
    streamed = stream_completion_text(client, **kw)
    assert streamed == {0: whole.text}
    ref = offline.generate(PROMPTS[1], greedy(24, stop=kw.get("stop")),
                           lora_request=lora_requests["a1"], use_tqdm=False)[0].outputs[0]
    assert whole.text == ref.text
    if use_stop:
        assert whole.finish_reason == "stop" and whole.stop_reason == kw["stop"][0]
        assert kw["stop"][0] not in whole.text


@pytest.mark.parametrize("use_stop", [False, True], ids=["no-stop", "stop"])
def test_streamed_chat_equals_non_streamed(client, use_stop):
    kw = dict(model="a0", messages=MESSAGES, max_tokens=24, temperature=0)
    if use_stop:
        content = client.chat.completions.create(**kw, logprobs=True).choices[0].logprobs.content
        kw["stop"] = _straddling_stop([item.token for item in content])
    whole = client.chat.completions.create(**kw).choices[0]
    texts, roles = stream_chat_text(client, **kw)
    assert texts == {0: whole.message.content}
    assert roles == {0: "assistant"}
    if use_stop:
        assert whole.finish_reason == "stop" and kw["stop"] not in whole.message.content


def test_streamed_prompt_list(client):
    kw = dict(model="a2", prompt=PROMPTS[2:5], max_tokens=10, temperature=0, n=2, seed=5)
    whole = client.completions.create(**kw)
    assert stream_completion_text(client, **kw) == {c.index: c.text for c in whole.choices}
    assert sorted(c.index for c in whole.choices) == list(range(6))


def test_stream_usage_chunk(client):
    chunks = list(client.completions.create(model=BASE, prompt=PROMPTS[0], max_tokens=5,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True},
                                            stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    chat = list(client.chat.completions.create(model="a2", messages=MESSAGES, max_tokens=5,
                                               temperature=0, stream=True,
                                               extra_body={"ignore_eos": True},
                                               stream_options={"include_usage": True}))
    assert chat[-1].choices == [] and chat[-1].usage.completion_tokens == 5


def test_n2_with_seed_is_reproducible(client, offline, lora_requests):
    kw = dict(model="a2", prompt=PROMPTS[4], max_tokens=10, temperature=1.0, n=2, seed=1234)
    first = client.completions.create(**kw)
    second = client.completions.create(**kw)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in second.choices]
    assert texts[0] != texts[1]
    ref = offline.generate(PROMPTS[4], SamplingParams(n=2, temperature=1.0, seed=1234,
                                                      max_tokens=10),
                           lora_request=lora_requests["a2"], use_tqdm=False)[0]
    assert texts == [o.text for o in ref.outputs]
    assert stream_completion_text(client, **kw) == dict(enumerate(texts))
    chat_kw = dict(model="a2", messages=MESSAGES, max_tokens=10, temperature=1.0, n=2,
                   seed=99)
    chat = [c.message.content for c in client.chat.completions.create(**chat_kw).choices]
    assert chat[0] != chat[1]
    assert stream_chat_text(client, **chat_kw)[0] == dict(enumerate(chat))


# -- logprobs ------------------------------------------------------------------------------

def _assert_top_dict(server_top: dict[str, float], entry) -> None:
    ref = {lp.decoded_token: lp.logprob for lp in entry.values()}
    assert server_top.keys() == ref.keys()
    for token, value in ref.items():
        assert server_top[token] == pytest.approx(value, abs=LOGPROB_TOL)


def test_completion_logprobs_equal_offline(client, offline, lora_requests):
    prompt = PROMPTS[3]
    ref = offline.generate(prompt, greedy(8, logprobs=3, prompt_logprobs=3),
                           lora_request=lora_requests["a0"], use_tqdm=False)[0]
    out = client.completions.create(model="a0", prompt=prompt, max_tokens=8, temperature=0,
                                    logprobs=3).choices[0]
    lp = out.logprobs
    c = ref.outputs[0]
    n = len(c.token_ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == \
        len(lp.text_offset) == n
    assert "".join(lp.tokens) == out.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    for i, (token_id, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        assert lp.token_logprobs[i] == pytest.approx(entry[token_id].logprob, abs=LOGPROB_TOL)
        assert len(lp.top_logprobs[i]) <= 4
        _assert_top_dict(lp.top_logprobs[i], entry)

    echo = client.completions.create(model="a0", prompt=prompt, max_tokens=8, temperature=0,
                                     logprobs=3, echo=True).choices[0]
    prompt_len = len(ref.prompt_token_ids)
    assert echo.text == prompt + out.text
    elp = echo.logprobs
    assert len(elp.tokens) == prompt_len + n
    assert elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    for i in range(1, prompt_len):
        entry = ref.prompt_logprobs[i]
        token_id = ref.prompt_token_ids[i]
        assert elp.token_logprobs[i] == pytest.approx(entry[token_id].logprob, abs=LOGPROB_TOL)
        _assert_top_dict(elp.top_logprobs[i], entry)
    assert elp.token_logprobs[prompt_len:] == pytest.approx(lp.token_logprobs, abs=LOGPROB_TOL)

    chunks = [c.choices[0] for c in client.completions.create(
        model="a0", prompt=prompt, max_tokens=8, temperature=0, logprobs=3, echo=True,
        stream=True)]
    assert "".join(c.text for c in chunks) == echo.text
    assert [t for c in chunks for t in c.logprobs.tokens] == elp.tokens
    assert [t for c in chunks for t in c.logprobs.text_offset] == elp.text_offset


def test_chat_logprobs_equal_offline(client, offline, lora_requests):
    ref = offline.chat(MESSAGES, greedy(8, logprobs=3), lora_request=lora_requests["a1"],
                       use_tqdm=False)[0].outputs[0]
    kw = dict(model="a1", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
              top_logprobs=3)
    content = client.chat.completions.create(**kw).choices[0].logprobs.content
    assert len(content) == len(ref.token_ids)
    for item, token_id, entry in zip(content, ref.token_ids, ref.logprobs):
        chosen = entry[token_id]
        assert item.token == chosen.decoded_token
        assert item.bytes == list(chosen.decoded_token.encode())
        assert item.logprob == pytest.approx(chosen.logprob, abs=LOGPROB_TOL)
        top = sorted((e for e in entry.values() if e.rank <= 3), key=lambda e: e.rank)
        assert [t.token for t in item.top_logprobs] == [e.decoded_token for e in top]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(
            [e.logprob for e in top], abs=LOGPROB_TOL)
    streamed = [item for chunk in client.chat.completions.create(stream=True, **kw)
                for choice in chunk.choices if choice.logprobs
                for item in choice.logprobs.content]
    assert [s.model_dump() for s in streamed] == [c.model_dump() for c in content]


# -- adapters at run time, errors, auth ----------------------------------------------------

def test_runtime_adapter_load_use_unload(client, http, offline, lora_requests, adapters):
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "runtime",
                                                 "lora_path": adapters["runtime"]})
    assert r.status_code == 200, r.text
    card = next(m for m in client.models.list().data if m.id == "runtime")
    assert card.parent == BASE and card.root == adapters["runtime"]
    out = client.completions.create(model="runtime", prompt=PROMPTS[0], max_tokens=10,
                                    temperature=0)
    ref = offline.generate(PROMPTS[0], greedy(10), lora_request=lora_requests["runtime"],
                           use_tqdm=False)[0]
    assert out.choices[0].text == ref.outputs[0].text

    again = http.post("/v1/load_lora_adapter", json={"lora_name": "runtime",
                                                     "lora_path": adapters["runtime"]})
    assert again.status_code == 400 and "already" in again.json()["error"]["message"]
    assert http.post("/v1/unload_lora_adapter",
                     json={"lora_name": "runtime"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="runtime", prompt=PROMPTS[0], max_tokens=2)
    missing = http.post("/v1/unload_lora_adapter", json={"lora_name": "runtime"})
    assert missing.status_code == 404


def test_bad_adapter_at_run_time_is_400(server, http, tmp_path):
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "bad",
                                                 "lora_path": str(tmp_path / "nowhere")})
    assert r.status_code == 400
    assert "not a directory" in r.json()["error"]["message"]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "bad",
                                                 "lora_path": str(tmp_path / "broken")})
    assert r.status_code == 400 and "bad" in r.json()["error"]["message"]
    assert httpx2.get(server.url + "/health").status_code == 200
    assert "bad" not in {m["id"] for m in http.get("/v1/models").json()["data"]}


def _error(r: httpx2.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


def test_errors(client, http):
    error = _error(http.post("/v1/completions", json={"model": "nope", "prompt": "hi"}), 404)
    assert "nope" in error["message"]
    _error(http.post("/v1/chat/completions", json={"model": "nope", "messages": MESSAGES}), 404)
    too_long = "hello " * (MAX_MODEL_LEN + 10)
    assert "max_model_len" in _error(http.post("/v1/completions", json={
        "model": BASE, "prompt": too_long}), 400)["message"]
    _error(http.post("/v1/completions", json={"model": BASE, "prompt": "hi",
                                              "temperature": -1}), 400)
    _error(http.post("/v1/completions", json={"model": BASE, "prompt": "hi", "n": 0}), 400)
    _error(http.post("/v1/completions", json={"model": BASE, "prompt": "hi", "n": 10 ** 6}), 400)
    _error(http.post("/v1/completions", json={"model": BASE, "prompt": "hi",
                                              "max_tokens": "many"}), 400)
    _error(http.post("/v1/completions", json={"model": BASE}), 400)
    _error(http.post("/v1/chat/completions", json={"model": BASE, "messages": [{"x": 1}]}), 400)
    _error(http.post("/v1/completions", content=b"{not json",
                     headers={"content-type": "application/json"}), 400)
    _error(http.post("/v1/completions", json={"model": BASE, "prompt": "hi",
                                              "stop_token_ids": [10 ** 6]}), 400)
    _error(http.post("/v1/completions", json={"model": BASE, "prompt": "hi",
                                              "logprobs": 1000}), 400)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE, prompt="hi", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    # errors before the first token are plain HTTP errors for streams too
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE, prompt=too_long, stream=True)
    assert http.get("/health").status_code == 200


def test_api_key(server):
    body = {"model": BASE, "prompt": "hi", "max_tokens": 2}
    assert _error(httpx2.post(server.url + "/v1/completions", json=body), 401)
    assert _error(httpx2.get(server.url + "/v1/models",
                             headers={"Authorization": "Bearer wrong"}), 401)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    for open_path in ("/health", "/version", "/metrics"):
        assert httpx2.get(server.url + open_path).status_code == 200


# -- load ----------------------------------------------------------------------------------

def test_concurrent_streams_over_adapters(server, offline, lora_requests):
    """32 streams over the base model and 3 adapters (2 adapter slots)."""
    models = [MODELS[i % 4] for i in range(32)]
    prompts = [PROMPTS[(i // 4 + i) % len(PROMPTS)] for i in range(32)]
    ref = offline.generate(prompts, greedy(16), use_tqdm=False,
                           lora_request=[lora_of(lora_requests, m) for m in models])

    async def one(client: openai.AsyncOpenAI, model: str, prompt: str) -> tuple[str, int]:
        text, usage = "", None
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, usage

    async def run() -> list[tuple[str, int]]:
        async with server.async_client() as client:
            return await asyncio.gather(*(one(client, m, p) for m, p in zip(models, prompts)))

    results = asyncio.run(run())
    for (text, tokens), r in zip(results, ref):
        assert text == r.outputs[0].text
        assert tokens == len(r.outputs[0].token_ids)


def _wait_for_abort(server: RemoteServer, aborted_before: float) -> None:
    """Until one more request was aborted and nothing runs or holds KV blocks."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = metrics_text(server)
        if metric(text, "vllm:request_success_total", finished_reason="abort") > aborted_before \
                and metric(text, "vllm:kv_cache_usage_perc") == 0 \
                and metric(text, "vllm:num_requests_running") == 0:
            return
        time.sleep(0.1)
    pytest.fail("the disconnected request was not aborted")


def _aborted(server: RemoteServer) -> float:
    return metric(metrics_text(server), "vllm:request_success_total", finished_reason="abort")


def test_client_disconnect_aborts_request(server, client):
    body = {"model": "a1", "prompt": PROMPTS[0], "max_tokens": 240, "ignore_eos": True,
            "temperature": 0}
    before = _aborted(server)
    with httpx2.Client(base_url=server.url, headers=server.headers(), timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # leave after the first chunk: the connection closes
    _wait_for_abort(server, before)

    # a non-streaming request whose client gives up is aborted too
    before = _aborted(server)
    with pytest.raises(httpx2.TimeoutException):
        httpx2.post(server.url + "/v1/completions", json=body, headers=server.headers(),
                    timeout=0.3)
    _wait_for_abort(server, before)

    out = client.completions.create(model="a1", prompt=PROMPTS[0], max_tokens=4,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4


def test_metrics_by_adapter(server, client):
    for model in MODELS:
        client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=3,
                                  extra_body={"ignore_eos": True})
    text = metrics_text(server)
    for model in MODELS:
        for name in ("vllm:request_success_total", "vllm:prompt_tokens_total",
                     "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_count",
                     "vllm:inter_token_latency_seconds_count"):
            assert metric(text, name, model_name=model) > 0, (name, model)
    assert metric(text, "vllm:num_requests_waiting") == 0


def test_benchmark_serving(server):
    path = os.path.join(ROOT, "benchmarks", "benchmark_serving.py")
    spec = importlib.util.spec_from_file_location("benchmark_serving", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    summary = bench.main(["--base-url", server.url, "--api-key", API_KEY, "--adapters",
                          "a0,a1,a2", "--base-fraction", "0.25", "--num-prompts", "12",
                          "--request-rate", "inf", "--max-concurrency", "8",
                          "--input-len", "16", "--output-len", "8"])
    assert summary["completed"] == 12 and summary["failed"] == 0
    assert summary["output_throughput"] > 0 and summary["ttft_ms"]["p50"] > 0
