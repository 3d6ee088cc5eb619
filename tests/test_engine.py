"""Continuous batching, preemption and chunked prefill give the same tokens
as running each request alone."""
import pytest

from tests.utils import PROMPTS, model_dir
from vllm import LLM, SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.llm_engine import LLMEngine

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return model_dir(str(tmp_path_factory.getbasetemp()), "qwen3_moe")


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


def test_batched_together_equals_alone(path, reference):
    llm = LLM(path, dtype="float32", max_model_len=256)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference


def test_staggered_arrivals_join_running_batch(path, reference):
    engine = LLMEngine.from_engine_args(EngineArgs(path, dtype="float32", max_model_len=256),
                                        progress=False)
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4], 7: [5], 9: [6, 7]}
    done = run_staggered(engine, arrivals)
    assert {int(k): v for k, v in done.items()} == dict(enumerate(reference))


def test_preemption_under_tiny_kv_cache_keeps_outputs(path, reference):
    # 16 blocks of 4 tokens: the longest request alone needs 13, so running
    # several at once must preempt and recompute.
    engine = LLMEngine.from_engine_args(
        EngineArgs(path, dtype="float32", max_model_len=64, block_size=4,
                   num_gpu_blocks_override=16), progress=False)
    done = run_staggered(engine, {0: list(range(len(PROMPTS)))})
    assert {int(k): v for k, v in done.items()} == dict(enumerate(reference))
    assert engine.block_manager.num_free_blocks == 16


def test_preemption_is_counted_and_recomputed_exactly(path):
    # four short prompts that each grow to 11 blocks: they all start, then
    # the cache runs out while they decode
    engine = LLMEngine.from_engine_args(
        EngineArgs(path, dtype="float32", max_model_len=64, block_size=4,
                   num_gpu_blocks_override=16), progress=False)
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


def test_chunked_prefill_matches(path, reference):
    llm = LLM(path, dtype="float32", max_model_len=256, max_num_batched_tokens=5)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference


def test_max_num_seqs_limits_the_batch(path):
    engine = LLMEngine.from_engine_args(
        EngineArgs(path, dtype="float32", max_model_len=128, max_num_seqs=3), progress=False)
    for i in range(6):
        engine.add_request(str(i), PROMPTS[i], GREEDY)
    engine.step()
    assert len(engine.scheduler.running) == 3 and len(engine.scheduler.waiting) == 3


def test_final_only_requests_report_once(path, reference):
    """A FINAL_ONLY request (what LLM.generate sends) appears in no step's
    outputs until it finishes; a CUMULATIVE one appears at every step."""
    from dataclasses import replace

    from vllm.sampling_params import RequestOutputKind
    engine = LLMEngine.from_engine_args(EngineArgs(path, dtype="float32", max_model_len=256))
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
