"""Architectures by ``config.architectures[0]``."""
from __future__ import annotations

import importlib

from vllm.model_executor.models.moe_transformer import MoEForCausalLM

_MODELS = {
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "OlmoeForCausalLM": "olmoe",
    "Glm4MoeForCausalLM": "glm4_moe",
    "GptOssForCausalLM": "gpt_oss",
}


class UnsupportedArchitectureError(ValueError):
    pass


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def model_class(architecture: str) -> type[MoEForCausalLM]:
    if architecture not in _MODELS:
        raise UnsupportedArchitectureError(
            f"model architecture {architecture!r} is not supported; supported: "
            + ", ".join(supported_architectures()))
    module = importlib.import_module(f"vllm.model_executor.models.{_MODELS[architecture]}")
    return getattr(module, architecture)
