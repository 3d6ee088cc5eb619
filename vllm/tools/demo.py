"""Offline demo: build a tiny MoE checkpoint and generate from it.

    python -m vllm.tools.demo
"""
from __future__ import annotations

import os
import tempfile

from vllm import LLM, SamplingParams
from vllm.tools.make_tiny_model import make_tiny_model


def main() -> None:
    path = make_tiny_model("qwen3_moe", os.path.join(tempfile.gettempdir(), "vllm-demo-qwen3-moe"))
    llm = LLM(path, dtype="float32", max_model_len=256)
    prompts = ["hello world", "The quick brown fox", "café naïve 日本語"]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    for prompt, out in zip(prompts, outputs):
        print(f"{prompt!r} -> {out.outputs[0].token_ids} ({out.outputs[0].finish_reason})")


if __name__ == "__main__":
    main()
