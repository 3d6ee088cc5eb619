"""NVIDIA ModelOpt checkpoints: ``hf_quant_config.json`` (``quantization:
{quant_algo, group_size, exclude_modules}``) or a ``quant_method: modelopt``
quantization_config.

- ``NVFP4``: ``weight`` uint8 (E2M1 pairs), ``weight_scale`` E4M3 per 16
  values, ``weight_scale_2`` float32 per tensor (multiplied), and
  ``input_scale`` (activations; not applied: weight-only here);
- ``FP8``: per-tensor E4M3 weights with static per-tensor activation scales.
"""
from __future__ import annotations

from typing import Any

from vllm.model_executor.quantization.base import (QuantizationConfig, QuantizationError,
                                                   get_field, matches_module_path)
from vllm.model_executor.quantization.fp8 import Fp8LinearMethod, Fp8MoEMethod, Fp8Scheme
from vllm.model_executor.quantization.fp8_activation import Fp8ActScheme
from vllm.model_executor.quantization.weight_only import (PackedScheme, WeightOnlyLinearMethod,
                                                          WeightOnlyMoEMethod)


class ModelOptConfig(QuantizationConfig):
    name = "modelopt"

    def __init__(self, architecture: str, cfg: dict[str, Any]):
        super().__init__(architecture)
        algo = str(get_field(cfg, "quant_algo", default="")).upper()
        self.algo = algo
        if algo == "NVFP4":
            group = int(get_field(cfg, "group_size", default=16))
            if group != 16:
                raise QuantizationError(f"modelopt NVFP4 with group size {group} is not supported")
            self.scheme = PackedScheme("nvfp4", 16, "weight", "weight_scale",
                                       global_name="weight_scale_2", global_is_divisor=False)
        elif algo == "FP8":
            self.scheme = Fp8Scheme("tensor", Fp8ActScheme("static"))
        else:
            raise QuantizationError(f"modelopt quant_algo {algo or '(none)'!r} is not supported "
                                    "(NVFP4 and FP8 are)")
        if get_field(cfg, "kv_cache_quant_algo"):
            raise QuantizationError("modelopt KV cache quantization is not supported")
        self.exclude = list(get_field(cfg, "exclude_modules", "ignore", default=[]) or [])

    def _quantized(self, name: str) -> bool:
        return not any(matches_module_path(name, p) for p in self.exclude)

    def linear_method(self, prefix):
        if not self.resolve(prefix, self._quantized):
            return None
        if isinstance(self.scheme, Fp8Scheme):
            return Fp8LinearMethod(self.scheme)
        return WeightOnlyLinearMethod(self.scheme)

    def moe_method(self, prefix):
        if not self.resolve(prefix, self._quantized):
            return None
        if isinstance(self.scheme, Fp8Scheme):
            return Fp8MoEMethod(self.scheme)
        return WeightOnlyMoEMethod(self.scheme)

    def skip_checkpoint_key(self, name: str) -> bool:
        # NVFP4 activation scales: activations stay unquantized here
        return self.algo == "NVFP4" and name.endswith(".input_scale")
