"""Sampling semantics: seeds, top-k/p, stops, logprobs, penalties, n."""
import math

import pytest
import torch

from tests.utils import PROMPTS, hf_logits, model_dir
from vllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return model_dir(str(tmp_path_factory.getbasetemp()), "qwen3_moe")


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(path, request):
    return LLM(path, dtype="float32", max_model_len=256, async_scheduling=request.param)


def tokens(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate(PROMPTS[:1], params, use_tqdm=False)
    batched = llm.generate(PROMPTS[:4], params, use_tqdm=False)
    assert tokens(alone)[0] == tokens(batched)[0]
    other = llm.generate(PROMPTS[:1], SamplingParams(temperature=1.0, seed=99, max_tokens=10,
                                                     ignore_eos=True), use_tqdm=False)
    assert tokens(other) != tokens(alone)


def test_top_k_one_equals_greedy(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                          use_tqdm=False)
    top1 = llm.generate(PROMPTS, SamplingParams(temperature=0.9, top_k=1, max_tokens=8,
                                                ignore_eos=True), use_tqdm=False)
    assert tokens(greedy) == tokens(top1)


def test_tiny_top_p_equals_greedy(llm):
    greedy = llm.generate(PROMPTS[:4], SamplingParams(temperature=0, max_tokens=8,
                                                      ignore_eos=True), use_tqdm=False)
    top_p = llm.generate(PROMPTS[:4], SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=8,
                                                     ignore_eos=True), use_tqdm=False)
    assert tokens(greedy) == tokens(top_p)


def test_stop_string_cuts_exactly(llm):
    full = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=16,
                                                   ignore_eos=True), use_tqdm=False)[0].outputs[0]
    text = full.text
    stop = text[5:8]
    assert stop and stop in text
    cut = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=16, stop=[stop],
                                                  ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert cut.text == text[:text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=16, stop=stop,
                                                   include_stop_str_in_output=True,
                                                   ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[:text.index(stop) + len(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    full = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12,
                                                   ignore_eos=True), use_tqdm=False)[0].outputs[0]
    target = full.token_ids[3]
    first = full.token_ids.index(target)
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12,
                                                  stop_token_ids=[target], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target
    # min_tokens forbids the stop token before 6 tokens exist
    late = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, min_tokens=6,
                                                   stop_token_ids=[target], ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert target not in late.token_ids[:5] and len(late.token_ids) >= 6


def test_max_tokens_finish_reason_length(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_logprobs_equal_hf_log_softmax(llm, path):
    tok = llm.get_tokenizer()
    out = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=6, logprobs=5,
                                                  ignore_eos=True), use_tqdm=False)[0].outputs[0]
    prompt = tok.encode(PROMPTS[2])
    ref = torch.log_softmax(hf_logits(path, prompt + out.token_ids), dim=-1)[len(prompt) - 1:-1]
    total = 0.0
    for step, (entry, token) in enumerate(zip(out.logprobs, out.token_ids)):
        assert token in entry and len(entry) in (5, 6)
        top = ref[step].topk(5)
        assert sorted(entry)[:0] == [] and set(top.indices.tolist()) <= set(entry)
        for tid, lp in entry.items():
            assert abs(lp.logprob - ref[step, tid].item()) < 1e-4
        assert entry[token].rank == 1
        assert entry[token].decoded_token == tok.decode([token])
        total += entry[token].logprob
    assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-6, abs_tol=1e-6)


def test_sampled_token_rank_is_reported(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=5.0, seed=3, max_tokens=8,
                                                  logprobs=0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    for entry, token in zip(out.logprobs, out.token_ids):
        assert list(entry) == [token] and entry[token].rank >= 1
    assert any(entry[t].rank > 1 for entry, t in zip(out.logprobs, out.token_ids))


def test_repetition_penalty_changes_greedy_output(llm):
    base = llm.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=16,
                                                   ignore_eos=True), use_tqdm=False)
    strong = llm.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=16,
                                                     repetition_penalty=2.0, presence_penalty=2.0,
                                                     frequency_penalty=2.0, ignore_eos=True),
                          use_tqdm=False)
    ids = strong[0].outputs[0].token_ids
    assert ids != base[0].outputs[0].token_ids
    assert len(set(ids)) >= len(set(base[0].outputs[0].token_ids))


def test_n_samples_with_seed(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    first = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    again = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert tokens([first]) == tokens([again])
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"min_p": 2}, "min_p"), ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n must"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"stop": [""]}, "stop"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"logprobs": -1}, "logprobs"),
])
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("chunk", [None, 4])
def test_prompt_logprobs_equal_hf(path, chunk, async_scheduling):
    llm = LLM(path, dtype="float32", max_model_len=256, max_num_batched_tokens=chunk or 8192,
              async_scheduling=async_scheduling)
    tok = llm.get_tokenizer()
    out = llm.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3),
                       use_tqdm=False)[0]
    ids = tok.encode(PROMPTS[3])
    ref = torch.log_softmax(hf_logits(path, ids), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for pos, entry in enumerate(out.prompt_logprobs[1:]):
        target = ids[pos + 1]
        assert target in entry and len(entry) in (3, 4)
        assert set(ref[pos].topk(3).indices.tolist()) <= set(entry)
        for tid, lp in entry.items():
            assert abs(lp.logprob - ref[pos, tid].item()) < 1e-4
        assert entry[target].rank == int((ref[pos] > ref[pos, target]).sum()) + 1


def test_chat_applies_the_template(llm):
    tok = llm.get_tokenizer()
    messages = [{"role": "user", "content": "hello there"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                   use_tqdm=False)[0]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert out.prompt_token_ids == tok.encode(rendered, add_special_tokens=False)
    direct = llm.generate({"prompt_token_ids": out.prompt_token_ids},
                          SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)[0]
    assert out.outputs[0].token_ids == direct.outputs[0].token_ids
    two = llm.chat([messages, [{"role": "user", "content": "bye"}]],
                   SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(two) == 2


def test_penalties_match_a_per_token_reference():
    """apply_penalties against the rules written out token by token: repetition
    on prompt and generated tokens, frequency per generated repeat, presence
    once per generated token."""
    from vllm.model_executor.layers.sampler import SamplingMetadata, apply_penalties
    g = torch.Generator().manual_seed(0)
    V = 11
    logits = torch.randn(3, V, generator=g) * 3
    prompts = [[1, 2, 2], [5], []]
    outputs = [[2, 3, 3, 3], [], [7, 7, 0]]
    rep, freq, pres = [1.5, 1.2, 1.0], [0.5, 0.0, 1.0], [0.25, 0.7, 0.0]
    expected = logits.clone()
    for i in range(3):
        for t in range(V):
            if t in prompts[i] or t in outputs[i]:
                x = expected[i, t]
                expected[i, t] = x / rep[i] if x > 0 else x * rep[i]
            n = outputs[i].count(t)
            expected[i, t] -= freq[i] * n + pres[i] * (n > 0)

    def pairs(lists):
        return (torch.tensor([i for i, ids in enumerate(lists) for _ in ids], dtype=torch.long),
                torch.tensor([t for ids in lists for t in ids], dtype=torch.long))

    (out_rows, out_ids), (prompt_rows, prompt_ids) = pairs(outputs), pairs(prompts)
    row = torch.tensor
    meta = SamplingMetadata(
        temperature=row([0.0] * 3), top_p=row([1.0] * 3), top_k=row([0] * 3), min_p=row([0.0] * 3),
        presence_penalty=row(pres), frequency_penalty=row(freq), repetition_penalty=row(rep),
        generators={}, penalty_output_rows=out_rows, penalty_output_ids=out_ids,
        penalty_prompt_rows=prompt_rows, penalty_prompt_ids=prompt_ids, random_rows=[],
        random_rows_device=None, blocked_rows=None, blocked_token_ids=None,
        max_num_logprobs=None, no_penalties=False)
    torch.testing.assert_close(apply_penalties(logits, meta), expected)
