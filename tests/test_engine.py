"""Continuous batching, preemption and chunked prefill give the same tokens
as running each request alone, with steps scheduled one at a time (sync)
or while the previous step still runs (async scheduling)."""
import pytest

from tests.utils import PROMPTS, model_dir
from vllm import LLM, SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.llm_engine import LLMEngine

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return model_dir(str(tmp_path_factory.getbasetemp()), "qwen3_moe")


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_scheduling(request):
    return request.param


@pytest.fixture(scope="module")
def reference(path):
    """Each prompt generated alone, one request per engine step."""
    llm = LLM(path, dtype="float32", max_model_len=256, max_num_seqs=1)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def run_staggered(engine: LLMEngine, arrivals: dict[int, list[int]]) -> dict[str, list[int]]:
    """Add prompt i at step arrivals[step]; run to completion."""
    done: dict[str, list[int]] = {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished_requests():
        for i in arrivals.get(step, []):
            engine.add_request(str(i), PROMPTS[i], GREEDY)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        step += 1
    return done


def test_batched_together_equals_alone(async_scheduling, path, reference):
    llm = LLM(path, dtype="float32", max_model_len=256, async_scheduling=async_scheduling)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference


def test_staggered_arrivals_join_running_batch(async_scheduling, path, reference):
    engine = LLMEngine.from_engine_args(
        EngineArgs(path, dtype="float32", max_model_len=256, async_scheduling=async_scheduling),
        progress=False)
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4], 7: [5], 9: [6, 7]}
    done = run_staggered(engine, arrivals)
    assert {int(k): v for k, v in done.items()} == dict(enumerate(reference))


def test_preemption_under_tiny_kv_cache_keeps_outputs(async_scheduling, path, reference):
    # 16 blocks of 4 tokens: the longest request alone needs 13, so running
    # several at once must preempt and recompute.
    engine = LLMEngine.from_engine_args(
        EngineArgs(path, dtype="float32", max_model_len=64, block_size=4,
                   num_gpu_blocks_override=16, async_scheduling=async_scheduling), progress=False)
    done = run_staggered(engine, {0: list(range(len(PROMPTS)))})
    assert {int(k): v for k, v in done.items()} == dict(enumerate(reference))
    assert engine.block_manager.num_free_blocks == 16


def test_preemption_is_counted_and_recomputed_exactly(async_scheduling, path):
    # four short prompts that each grow to 11 blocks: they all start, then
    # the cache runs out while they decode
    engine = LLMEngine.from_engine_args(
        EngineArgs(path, dtype="float32", max_model_len=64, block_size=4,
                   num_gpu_blocks_override=16, async_scheduling=async_scheduling), progress=False)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outs = []
    for i in range(4):
        engine.add_request(str(i), PROMPTS[0], params)
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    alone = LLM(path, dtype="float32", max_model_len=64).generate(PROMPTS[0], params,
                                                                  use_tqdm=False)
    assert outs[0].outputs[0].token_ids == alone[0].outputs[0].token_ids


def test_chunked_prefill_matches(async_scheduling, path, reference):
    llm = LLM(path, dtype="float32", max_model_len=256, max_num_batched_tokens=5,
              async_scheduling=async_scheduling)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference


def test_max_num_seqs_limits_the_batch(async_scheduling, path):
    engine = LLMEngine.from_engine_args(
        EngineArgs(path, dtype="float32", max_model_len=128, max_num_seqs=3,
                   async_scheduling=async_scheduling), progress=False)
    for i in range(6):
        engine.add_request(str(i), PROMPTS[i], GREEDY)
    engine.step()
    assert len(engine.scheduler.running) == 3 and len(engine.scheduler.waiting) == 3


def test_final_only_requests_report_once(async_scheduling, path, reference):
    """A FINAL_ONLY request (what LLM.generate sends) appears in no step's
    outputs until it finishes; a CUMULATIVE one appears at every step."""
    from dataclasses import replace

    from vllm.sampling_params import RequestOutputKind
    engine = LLMEngine.from_engine_args(
        EngineArgs(path, dtype="float32", max_model_len=256, async_scheduling=async_scheduling))
    engine.add_request("final", PROMPTS[0], replace(GREEDY, output_kind=RequestOutputKind.FINAL_ONLY))
    engine.add_request("every", PROMPTS[1], GREEDY)
    seen: dict[str, list] = {"final": [], "every": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert len(seen["every"]) == GREEDY.max_tokens
    assert [o.finished for o in seen["final"]] == [True]
    assert seen["final"][0].outputs[0].token_ids == reference[0]
    assert seen["every"][-1].outputs[0].token_ids == reference[1]


def mixed_requests() -> list[tuple[str, SamplingParams]]:
    """Requests exercising every host-side rule that could see a token late."""
    return [
        (PROMPTS[0], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)),
        (PROMPTS[1], SamplingParams(temperature=1.0, seed=11, max_tokens=14, ignore_eos=True,
                                    logprobs=2)),
        (PROMPTS[2], SamplingParams(temperature=0.8, top_k=5, seed=3, n=2, max_tokens=7,
                                    ignore_eos=True)),
        (PROMPTS[3], SamplingParams(temperature=0, max_tokens=16, stop=["e"], ignore_eos=True)),
        # greedy alone this prompt repeats one token five times: penalties must
        # see each step's newest token, even while it is still on the device
        (PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, min_tokens=4,
                                    repetition_penalty=1.2, frequency_penalty=0.3,
                                    ignore_eos=True)),
        (PROMPTS[5], SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2)),
        (PROMPTS[6], SamplingParams(temperature=0, max_tokens=30)),
    ]


def run_mixed_requests(path: str, async_scheduling: bool, **engine_kwargs) -> list:
    llm = LLM(path, dtype="float32", max_model_len=256, async_scheduling=async_scheduling,
              **engine_kwargs)
    prompts, params = zip(*mixed_requests())
    outs = llm.generate(list(prompts), list(params), use_tqdm=False)
    llm.llm_engine.shutdown()
    return [(o.prompt_logprobs, [(c.token_ids, c.text, c.finish_reason, c.stop_reason,
                                  c.logprobs) for c in o.outputs]) for o in outs]


def test_async_scheduling_matches_sync_on_mixed_requests(path):
    sync = run_mixed_requests(path, False, max_num_batched_tokens=24)
    assert run_mixed_requests(path, True, max_num_batched_tokens=24) == sync
    assert any(c[2] == "stop" for _, cs in sync for c in cs)  # the stop rules were hit


@pytest.mark.gpu
def test_gpu_async_scheduling_matches_sync(path):
    """On the GPU (decode CUDA graphs, pinned copies, tokens fed back on the device)."""
    sync = run_mixed_requests(path, False, device="cuda")
    assert run_mixed_requests(path, True, device="cuda") == sync


def test_async_step_launches_before_returning_the_previous_one(path):
    engine = LLMEngine.from_engine_args(
        EngineArgs(path, dtype="float32", max_model_len=256, async_scheduling=True),
        progress=False)
    engine.add_request("a", PROMPTS[0], SamplingParams(temperature=0, max_tokens=3,
                                                       ignore_eos=True))
    assert engine.step() == []  # the prefill is launched, its token not yet taken
    request = engine.requests["a"]
    assert request.pending_rows == [0] and request.num_tokens == request.num_known_tokens + 1
    outputs = engine.step()  # launches the first decode, then takes the prefill's token
    assert len(request.output_token_ids) == 1 and request.pending_rows == [0]
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1]
    steps = 2
    while engine.has_unfinished_requests():
        outputs += engine.step()
        steps += 1
    # three tokens, three launches, and one last call that only takes the final token
    assert steps == 4 and outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 3


def test_async_abort_while_a_step_runs(path):
    engine = LLMEngine.from_engine_args(
        EngineArgs(path, dtype="float32", max_model_len=256, async_scheduling=True),
        progress=False)
    for rid in ("keep", "drop"):
        engine.add_request(rid, PROMPTS[1], GREEDY)
    engine.step()
    engine.step()
    engine.abort_request("drop")  # its token of the step in flight is dropped
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert list(done) == ["keep"] and len(done["keep"].outputs[0].token_ids) == 12
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_async_scheduling_flag(path):
    import argparse

    from vllm.config import ConfigError
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    for flags, expected in (([], False), (["--async-scheduling"], True),
                            (["--no-async-scheduling"], False)):
        namespace = parser.parse_args(flags)
        namespace.model = path
        args = EngineArgs.from_cli_args(namespace)
        # auto is off on the CPU (the step runs on the host: nothing to overlap)
        assert args.create_engine_config().scheduler_config.async_scheduling is expected
    with pytest.raises(ConfigError, match="single rank"):
        EngineArgs(path, tensor_parallel_size=2, async_scheduling=True).create_engine_config()
