"""Everything a model needs to build its layers, passed explicitly."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vllm.distributed.parallel_state import ParallelContext
from vllm.model_executor.layers.attention.backend import AttentionBackend


@dataclass
class ModelBuildContext:
    hf_config: Any
    dtype: torch.dtype
    device: str
    attention_backend: AttentionBackend
    max_model_len: int
    parallel: ParallelContext = field(default_factory=ParallelContext.single)
    moe_backend: str = "auto"
    lora_enabled: bool = False
    # A quantization config (vllm/model_executor/quantization) or None.
    quant_config: Any = None

    def linear_method(self, prefix: str):
        return None if self.quant_config is None else self.quant_config.linear_method(prefix)

    def moe_method(self, prefix: str):
        return None if self.quant_config is None else self.quant_config.moe_method(prefix)
