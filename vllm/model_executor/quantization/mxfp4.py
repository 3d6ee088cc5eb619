"""GPT-OSS MXFP4 checkpoints (``quant_method: mxfp4``): only the routed
experts are quantized, stored stacked as ``gate_up_proj_blocks
[E, 2I, H / 32, 16]`` / ``down_proj_blocks [E, H, I / 32, 16]`` (E2M1 pairs,
output rows first, gate/up rows interleaved) with ``*_scales`` E8M0 per 32
values and float biases; attention, router, embeddings and LM head stay
unquantized (``modules_to_not_convert``)."""
from __future__ import annotations

from typing import Any

from vllm.model_executor.quantization.base import (QuantizationConfig, get_field,
                                                   matches_module_path)
from vllm.model_executor.quantization.weight_only import PackedScheme, WeightOnlyMoEMethod

MXFP4_SCHEME = PackedScheme("mxfp4", 32, "weight", "weight_scale")


class Mxfp4Config(QuantizationConfig):
    name = "mxfp4"

    def __init__(self, architecture: str, cfg: dict[str, Any]):
        super().__init__(architecture)
        self.ignore = list(get_field(cfg, "modules_to_not_convert", default=[]) or [])

    def linear_method(self, prefix):
        return None

    def moe_method(self, prefix):
        ignored = lambda n: any(matches_module_path(n, p)  # noqa: E731
                                for p in self.ignore)
        if not self.resolve(prefix, lambda n: not ignored(n)):
            return None
        return WeightOnlyMoEMethod(MXFP4_SCHEME)
