"""Tensor and expert parallelism with LoRA, 2 (and 4) ranks over gloo on the CPU.

Every parallel configuration must give the single-rank engine's greedy
tokens and logprobs within 1e-4, on batches that mix a per-expert adapter,
a 3D (target_parameters) adapter and base requests.
"""
import os
import signal
import time

import pytest

from tests.lora_utils import write_peft_3d_adapter, write_per_expert_adapter
from tests.utils import PROMPTS, model_dir
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
ENGINE = dict(dtype="float32", max_model_len=128, enable_lora=True, max_loras=2, max_lora_rank=8)

CONFIGS = {
    "tp2": dict(tensor_parallel_size=2),
    "ep2-linear": dict(tensor_parallel_size=2, enable_expert_parallel=True),
    "ep2-round-robin": dict(tensor_parallel_size=2, enable_expert_parallel=True,
                            expert_placement_strategy="round_robin"),
    "tp2-fully-sharded": dict(tensor_parallel_size=2, fully_sharded_loras=True),
    "ep2-fully-sharded": dict(tensor_parallel_size=2, enable_expert_parallel=True,
                              fully_sharded_loras=True),
}


def workload(path, root, arch):
    # GPT-OSS adapters are 3D (its experts are fused on disk); others get one of each format
    first = (write_peft_3d_adapter(path, str(root / "fused-a"), seed=1, rank=8, router=True)
             if arch == "gpt_oss" else
             write_per_expert_adapter(path, str(root / "per-expert"), seed=1, rank=8, shared=True))
    adapters = [first, write_peft_3d_adapter(path, str(root / "fused-3d"), seed=2, rank=8)]
    loras = [LoRARequest(f"a{i % 3}", i % 3 + 1, adapters[i % 3]) if i % 3 < 2 else None
             for i in range(6)]
    return PROMPTS[:6], loras


def run(path, prompts, loras, **kwargs):
    llm = LLM(path, **ENGINE, **kwargs)
    try:
        return llm.generate(prompts, PARAMS, lora_request=loras, use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()


def assert_same(outs, ref):
    for o, r in zip(outs, ref):
        a, b = o.outputs[0], r.outputs[0]
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            for tid in x.keys() & y.keys():
                assert abs(x[tid].logprob - y[tid].logprob) < 1e-4


@pytest.fixture(scope="module", params=["qwen3_moe", "gpt_oss"])
def case(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    path = model_dir(str(tmp_path_factory.getbasetemp()), request.param)
    prompts, loras = workload(path, root, request.param)
    return request.param, path, prompts, loras, run(path, prompts, loras)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_parallel_matches_single_rank(case, config):
    arch, path, prompts, loras, ref = case
    if arch == "gpt_oss" and config not in ("tp2", "ep2-round-robin"):
        pytest.skip("the full matrix runs on Qwen3-MoE; GPT-OSS covers fused 3D experts")
    assert_same(run(path, prompts, loras, **CONFIGS[config]), ref)


def test_four_ranks(case):
    arch, path, prompts, loras, ref = case
    if arch != "qwen3_moe":
        pytest.skip("one 4-rank run is enough")
    # 4 query heads, 2 KV heads: each KV head is replicated on two ranks
    assert_same(run(path, prompts, loras, tensor_parallel_size=4, enable_expert_parallel=True,
                    fully_sharded_loras=True), ref)


def test_fully_sharded_rank_must_divide(tmp_path):
    path = model_dir(str(tmp_path), "qwen3_moe")
    with pytest.raises(ValueError, match="divisible by --tensor-parallel-size"):
        LLM(path, dtype="float32", enable_lora=True, max_lora_rank=6, tensor_parallel_size=4,
            fully_sharded_loras=True)


def test_dead_worker_fails_loudly(tmp_path):
    from vllm.executor.distributed import WorkerDiedError
    path = model_dir(str(tmp_path), "qwen3_moe")
    llm = LLM(path, dtype="float32", max_model_len=128, tensor_parallel_size=2)
    worker = llm.llm_engine.executor.workers[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=10)
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match="worker rank 1"):
        llm.generate(PROMPTS[:2], PARAMS, use_tqdm=False)
    assert time.monotonic() - start < 20
    llm.llm_engine.shutdown()
    # the process can start a new multi-rank engine afterwards
    again = LLM(path, dtype="float32", max_model_len=128, tensor_parallel_size=2)
    assert again.generate(PROMPTS[0], PARAMS, use_tqdm=False)[0].outputs[0].token_ids
    again.llm_engine.shutdown()


def test_ray_backend(case):
    """The same engine with Ray actors as workers (a local Ray cluster)."""
    pytest.importorskip("ray")
    arch, path, prompts, loras, ref = case
    if arch != "qwen3_moe":
        pytest.skip("one Ray run is enough")
    assert_same(run(path, prompts, loras, tensor_parallel_size=2, enable_expert_parallel=True,
                    distributed_executor_backend="ray"), ref)
