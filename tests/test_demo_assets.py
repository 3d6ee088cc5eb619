"""The shipped README-demo files (demo/assets, made by vllm.tools.demo_train)
still do what the demo says: through the engine, greedy answers on held-out
words are the word itself (base), the word in upper case ("upper" adapter) and
the word reversed ("reverse" adapter)."""
from __future__ import annotations

import json
import os

import pytest

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo",
                      "assets")
ADAPTERS = ("upper", "reverse")


def test_assets_layout():
    with open(os.path.join(ASSETS, "words.json")) as f:
        words = json.load(f)
    assert len(words["held_out"]) >= 10 and not set(words["held_out"]) & set(words["train"])
    with open(os.path.join(ASSETS, "model", "config.json")) as f:
        assert json.load(f)["architectures"] == ["Qwen3MoeForCausalLM"]
    for name in ADAPTERS:
        with open(os.path.join(ASSETS, "adapters", name, "adapter_config.json")) as f:
            cfg = json.load(f)
        # the adapters must touch the routed experts, not only attention
        assert set(cfg["target_parameters"]) == {"mlp.experts.gate_up_proj",
                                                 "mlp.experts.down_proj"}
        assert {"q_proj", "v_proj"} <= set(cfg["target_modules"])


def test_demo_assets_answers():
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.tools.demo_train import expected_answer, held_out_words, make_prompt

    words = held_out_words(ASSETS)
    words = words[::max(1, len(words) // 10)][:10]  # spread over the alphabet
    assert len(words) == 10
    llm = LLM(os.path.join(ASSETS, "model"), dtype="float32", max_model_len=128,
              enable_lora=True, max_loras=2, max_lora_rank=16)
    requests = {None: None} | {
        name: LoRARequest(name, i + 1, os.path.join(ASSETS, "adapters", name))
        for i, name in enumerate(ADAPTERS)}
    # one batch in which every request names its own adapter (or none)
    prompts, loras, keys = [], [], []
    for name, lora in requests.items():
        for w in words:
            prompts.append(make_prompt(w))
            loras.append(lora)
            keys.append((name, w))
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16), lora_request=loras,
                        use_tqdm=False)
    misses: dict[str | None, list] = {name: [] for name in requests}
    for (name, w), out in zip(keys, outs):
        got, want = out.outputs[0].text, expected_answer(w, name)
        if got != want or out.outputs[0].finish_reason != "stop":
            misses[name].append((w, want, got, out.outputs[0].finish_reason))
    for name, bad in misses.items():
        assert len(bad) <= 1, f"{name or 'base'}: {bad}"
