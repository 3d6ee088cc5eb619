"""AsyncLLMEngine in-process: the engine thread, aborts, idling, and what
the server does when the thread dies."""
from __future__ import annotations

import asyncio
import contextlib
import time

import httpx2
import pytest

from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.async_engine import EngineDeadError, GenerationRequest
from vllm.engine.llm_engine import InvalidRequestError, LLMEngine
from vllm.entrypoints.openai.api_server import build_app, create_components


def new_engine(model_path: str, async_scheduling: bool | None = None) -> LLMEngine:
    return LLMEngine(EngineArgs(model_path, dtype="float32", max_model_len=256,
                                async_scheduling=async_scheduling)
                     .create_engine_config(), progress=False)


# the engine thread with steps scheduled one by one and ahead of the device
@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def components(model_path, request):
    c = create_components(new_engine(model_path, request.param))
    yield c
    c.engine.shutdown()


def aborted(components) -> float:
    return components.registry.get_sample_value(
        "vllm:request_success_total",
        {"model_name": components.models.base_model_name, "finished_reason": "abort"}) or 0.0


def kv_usage(components) -> float:
    return components.registry.get_sample_value(
        "vllm:kv_cache_usage_perc", {"model_name": components.models.base_model_name})


def test_generate_streams_cumulative_outputs(components):
    async def run():
        outs = []
        async for out in components.engine.generate(
                "hello world", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                "r1"):
            outs.append(out)
        return outs

    outs = asyncio.run(run())
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == list(range(1, 7))
    assert [o.finished for o in outs] == [False] * 5 + [True]


def test_leaving_early_aborts(components):
    before = aborted(components)

    async def run():
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        async with contextlib.aclosing(components.engine.generate("hello", params, "r2")) as gen:
            async for _ in gen:
                break

    asyncio.run(run())
    deadline = time.monotonic() + 10
    while (aborted(components) == before or kv_usage(components) != 0) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert aborted(components) == before + 1 and kv_usage(components) == 0


def test_bad_request_fails_its_caller_only(components):
    async def run():
        good = GenerationRequest("ok", "hello", SamplingParams(max_tokens=2))
        bad = GenerationRequest("bad", {"prompt_token_ids": []}, SamplingParams(max_tokens=2))
        with pytest.raises(InvalidRequestError, match="empty"):
            await components.engine.add_requests([good, bad])
        # all or nothing: the good one was taken back, and the engine still serves
        outs = [o async for o in components.engine.generate("hello", SamplingParams(
            max_tokens=2), "ok")]
        assert outs[-1].finished

    asyncio.run(run())
    assert components.engine.is_running


def test_idle_engine_thread_sleeps(components):
    time.sleep(0.5)  # let thread pools stop spinning after the last step
    start = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - start < 0.1


def test_dead_engine_thread(model_path):
    components = create_components(new_engine(model_path))
    engine = components.engine

    def broken_step():
        raise RuntimeError("boom")

    engine.engine.step = broken_step
    app = build_app(components)

    async def run():
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/health")).status_code == 200
            # a stream in flight ends with an error event
            r = await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
            events = [line for line in r.text.splitlines() if line.startswith("data: ")]
            assert "boom" in events[-2] and '"code":500' in events[-2]
            assert events[-1] == "data: [DONE]"
            health = await client.get("/health")
            assert health.status_code == 503 and "boom" in health.json()["error"]["message"]
            for stream in (False, True):
                r = await client.post("/v1/completions", json={"prompt": "hi",
                                                               "stream": stream})
                assert r.status_code == 500 and "engine" in r.json()["error"]["message"]
            r = await client.post("/v1/chat/completions",
                                  json={"messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 500

    asyncio.run(run())
    assert not engine.is_running
    with pytest.raises(EngineDeadError):
        asyncio.run(engine.abort("x"))
    engine.abort_nowait(["x"])  # used from finally blocks: never raises
