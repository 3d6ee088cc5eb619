"""Many adapters in one engine: mixed batches, slot and CPU-cache swapping,
base requests untouched, and every bad-adapter case."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.lora_utils import (merged_hf_model, write_peft_3d_adapter, write_per_expert_adapter)
from tests.utils import PROMPTS, assert_greedy_consistent, model_dir
from vllm import LLM, SamplingParams
from vllm.engine.llm_engine import InvalidRequestError
from vllm.lora.peft import LoRAError
from vllm.lora.request import LoRARequest

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return model_dir(str(tmp_path_factory.getbasetemp()), "qwen3_moe")


@pytest.fixture(scope="module")
def adapters(path, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [
        write_per_expert_adapter(path, str(root / "a0"), seed=1),
        write_peft_3d_adapter(path, str(root / "a1"), seed=2),
        write_per_expert_adapter(path, str(root / "a2"), seed=3, rank=16, attention=("o_proj",)),
        write_peft_3d_adapter(path, str(root / "a3"), seed=4, rank=8, attention=("k_proj",)),
        write_per_expert_adapter(path, str(root / "a4"), seed=5, rank=4),
    ]


@pytest.fixture(scope="module")
def references(path, adapters):
    return [merged_hf_model(path, a) for a in adapters]


def run_mixed(llm, adapters, assignment):
    """assignment[i] = adapter index of prompt i (None: base)."""
    loras = [None if a is None else LoRARequest(f"a{a}", a + 1, adapters[a]) for a in assignment]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(assignment))]
    return prompts, llm.generate(prompts, GREEDY, lora_request=loras, use_tqdm=False)


def check(llm, path, references, prompts, outs, assignment):
    tok = llm.get_tokenizer()
    for prompt, out, a in zip(prompts, outs, assignment):
        ref = path if a is None else references[a]
        c = out.outputs[0]
        assert_greedy_consistent(ref, tok.encode(prompt), c.token_ids, c.logprobs)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_mixed_batch_three_adapters_and_base(path, adapters, references, async_scheduling):
    llm = LLM(path, dtype="float32", max_model_len=256, enable_lora=True, max_loras=3,
              max_lora_rank=16, async_scheduling=async_scheduling)
    assignment = [0, None, 1, 2, 0, None, 2, 1]
    prompts, outs = run_mixed(llm, adapters, assignment)
    check(llm, path, references, prompts, outs, assignment)
    # every adapter changed its requests relative to the base model
    base = llm.generate(prompts, GREEDY, use_tqdm=False)
    for a, o, b in zip(assignment, outs, base):
        assert (o.outputs[0].token_ids == b.outputs[0].token_ids) == (a is None)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_more_adapters_than_slots_and_cpu_cache(path, adapters, references, async_scheduling):
    # 5 adapters through 2 GPU slots and a CPU cache of 3: slots and cache
    # are both swapped (LRU) during the workload; all outputs stay exact
    llm = LLM(path, dtype="float32", max_model_len=256, enable_lora=True, max_loras=2,
              max_cpu_loras=3, max_lora_rank=16, async_scheduling=async_scheduling)
    assignment = [0, 1, 2, 3, 4, None, 4, 3, 2, 1, 0, None]
    prompts, outs = run_mixed(llm, adapters, assignment)
    check(llm, path, references, prompts, outs, assignment)
    manager = llm.llm_engine.runner.lora_manager
    assert len(manager.cpu_cache) == 3


def test_scheduler_keeps_adapter_count_per_step(path, adapters):
    llm = LLM(path, dtype="float32", max_model_len=256, enable_lora=True, max_loras=2,
              max_lora_rank=16)
    engine = llm.llm_engine
    for i in range(6):
        engine.add_request(str(i), PROMPTS[i], GREEDY, LoRARequest(f"a{i % 3}", i % 3 + 1,
                                                                   adapters[i % 3]))
    while engine.has_unfinished_requests():
        engine.step()
        running = {r.lora_int_id for r in engine.scheduler.running}
        assert len(running - {0}) <= 2


def test_base_requests_identical_with_lora_enabled(path, adapters):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = LLM(path, dtype="float32", max_model_len=256)
    with_lora = LLM(path, dtype="float32", max_model_len=256, enable_lora=True, max_loras=2,
                    max_lora_rank=16)
    expected = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, params, use_tqdm=False)]
    # alone, and mixed into batches with adapter requests
    alone = with_lora.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in alone] == expected
    loras = [None if i % 2 else LoRARequest("a0", 1, adapters[0]) for i in range(len(PROMPTS))]
    mixed = with_lora.generate(PROMPTS, params, lora_request=loras, use_tqdm=False)
    for i, out in enumerate(mixed):
        if loras[i] is None:
            assert out.outputs[0].token_ids == expected[i]
    # base-only steps after adapter steps and the other way round (a base-only
    # step skips the mapping update and leaves every layer without LoRA)
    manager = with_lora.llm_engine.runner.lora_manager
    again = with_lora.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == expected
    assert all(getattr(layer, "lora_context", None) is None for layer in manager.layers.values())
    adapter_only = with_lora.generate(PROMPTS[:1], params, lora_request=loras[0], use_tqdm=False)
    assert adapter_only[0].outputs[0].token_ids == mixed[0].outputs[0].token_ids
    assert adapter_only[0].outputs[0].token_ids != expected[0]


# -- bad adapters ----------------------------------------------------------------------

def edit_adapter(src, dst, config=None, tensors=None):
    shutil.copytree(src, dst)
    if config:
        cfg = json.load(open(os.path.join(dst, "adapter_config.json")))
        cfg.update(config)
        json.dump(cfg, open(os.path.join(dst, "adapter_config.json"), "w"))
    if tensors:
        t = load_file(os.path.join(dst, "adapter_model.safetensors"))
        tensors(t)
        save_file(t, os.path.join(dst, "adapter_model.safetensors"))
    return dst


def _first(t, suffix):
    return next(k for k in sorted(t) if k.endswith(suffix))


BAD = {
    "dora": ({"use_dora": True}, None, "DoRA"),
    "dora_vectors": (None, lambda t: t.__setitem__(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", torch.ones(64)),
        "DoRA"),
    "bias": ({"bias": "lora_only"}, None, "bias"),
    "bias_tensor": (None, lambda t: t.__setitem__(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", torch.ones(64)), "bias"),
    "rank_too_big": ({"r": 32}, lambda t: [t.__setitem__(k, torch.randn(32, v.shape[1])
                                                         if "lora_A" in k else
                                                         torch.randn(v.shape[0], 32))
                                           for k, v in list(t.items())], "max-lora-rank"),
    "unknown_target": (None, lambda t: t.update({
        "base_model.model.lm_head.lora_A.weight": torch.randn(8, 64),
        "base_model.model.lm_head.lora_B.weight": torch.randn(400, 8)}), "lm_head"),
    "shape_mismatch": (None, lambda t: t.__setitem__(
        _first(t, "self_attn.q_proj.lora_B.weight"), torch.randn(48, 8)), "do not fit"),
    "expert_shape_mismatch": (None, lambda t: t.__setitem__(
        _first(t, "experts.0.down_proj.lora_A.weight"), torch.randn(8, 31)), "do not fit"),
    "rank_mismatch": ({"r": 4}, None, "declared"),
    "non_finite": (None, lambda t: t[_first(t, "v_proj.lora_A.weight")].__setitem__(
        (0, 0), float("nan")), "non-finite"),
    "unpaired": (None, lambda t: t.pop(_first(t, "v_proj.lora_B.weight")), "pair"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_is_refused_and_engine_keeps_serving(path, adapters, tmp_path, case):
    config, tensors, message = BAD[case]
    bad = edit_adapter(adapters[0], str(tmp_path / case), config, tensors)
    llm = LLM(path, dtype="float32", max_model_len=256, enable_lora=True, max_lora_rank=16)
    good = LoRARequest("good", 1, adapters[0])
    expected = llm.generate(PROMPTS[:2], GREEDY, lora_request=good, use_tqdm=False)
    with pytest.raises(LoRAError, match=message):
        llm.generate(PROMPTS[:2], GREEDY, lora_request=LoRARequest("bad", 2, bad), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    again = llm.generate(PROMPTS[:2], GREEDY, lora_request=good, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in expected]


def test_missing_adapter_files(path, tmp_path, adapters):
    llm = LLM(path, dtype="float32", max_model_len=256, enable_lora=True, max_lora_rank=16)
    with pytest.raises(LoRAError, match="not a directory"):
        llm.generate("x", GREEDY, lora_request=LoRARequest("m", 1, str(tmp_path / "nope")))
    no_weights = edit_adapter(adapters[0], str(tmp_path / "noweights"))
    os.remove(os.path.join(no_weights, "adapter_model.safetensors"))
    with pytest.raises(LoRAError, match="no adapter_model"):
        llm.generate("x", GREEDY, lora_request=LoRARequest("m", 2, no_weights))
    no_config = edit_adapter(adapters[0], str(tmp_path / "noconfig"))
    os.remove(os.path.join(no_config, "adapter_config.json"))
    with pytest.raises(LoRAError, match="adapter_config.json"):
        llm.generate("x", GREEDY, lora_request=LoRARequest("m", 3, no_config))


def test_lora_request_without_enable_lora(path, adapters):
    llm = LLM(path, dtype="float32", max_model_len=256)
    with pytest.raises(InvalidRequestError, match="not enabled"):
        llm.generate("x", GREEDY, lora_request=LoRARequest("a", 1, adapters[0]))


def test_same_id_different_path_is_refused(path, adapters):
    llm = LLM(path, dtype="float32", max_model_len=256, enable_lora=True, max_lora_rank=16)
    llm.generate("x", GREEDY, lora_request=LoRARequest("a", 1, adapters[0]), use_tqdm=False)
    with pytest.raises(LoRAError, match="already used"):
        llm.generate("x", GREEDY, lora_request=LoRARequest("b", 1, adapters[1]), use_tqdm=False)


def test_base_only_steps_use_the_fastest_backend(path, adapters):
    """With LoRA on, a step whose adapters leave a MoE layer alone runs the
    backend a LoRA-free engine would (on the CPU: grouped_mm, which cannot
    do LoRA), with bit-identical results; steps with adapters use a
    LoRA-capable one."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    plain = LLM(path, dtype="float32", max_model_len=256)
    lora = LLM(path, dtype="float32", max_model_len=256, enable_lora=True, max_lora_rank=16)
    method = lora.llm_engine.runner.model.model.layers[0].mlp.experts.base_layer.quant_method
    assert method.base_kernel.experts.name == "grouped_mm"
    assert method.kernel.experts.supports_lora()
    a = plain.generate(PROMPTS, params, use_tqdm=False)
    b = lora.generate(PROMPTS, params, use_tqdm=False)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert [{t: v.logprob for t, v in d.items()} for d in x.outputs[0].logprobs] == \
            [{t: v.logprob for t, v in d.items()} for d in y.outputs[0].logprobs]


def test_slot_layers_are_the_layers_slot_adapters_touch(path, tmp_path):
    """What a LoRA decode graph records: the layers of the adapters in the slots."""
    attention_only = write_per_expert_adapter(path, str(tmp_path / "attn"), experts=(), seed=5)
    llm = LLM(path, dtype="float32", max_model_len=256, enable_lora=True, max_loras=2,
              max_lora_rank=16)
    manager = llm.llm_engine.runner.lora_manager
    assert manager.slot_layers == frozenset()
    llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("attn", 1, attention_only),
                 use_tqdm=False)
    assert {name.rsplit(".", 1)[-1] for name in manager.slot_layers} == {"qkv_proj"}
    llm.llm_engine.remove_lora(1)
    assert manager.slot_layers == frozenset()
