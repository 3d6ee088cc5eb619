"""compressed-tensors checkpoints (``quant_method: compressed-tensors``).

The ``compressed-tensors`` package parses and validates the config (config
groups, preset scheme names, ignore list); this module maps each scheme to
one of ours:

- FP8 weights (``float-quantized``): per tensor, per channel or per block,
  with static per-tensor, dynamic per-token / per-tensor / per-group
  activations, or none (W8A16) -> ``fp8``;
- symmetric INT4 weights in groups (``pack-quantized``, W4A16) -> INT4;
- FP4 weights in groups of 16 with a global scale
  (``nvfp4-pack-quantized``; activation quantization, if any, is not
  applied) -> NVFP4.

Anything else fails at load naming the scheme. Targets and the ignore list
are matched against checkpoint module names (``Linear`` matches every
linear layer; ``re:`` prefixes regular expressions).
"""
from __future__ import annotations

import re
from typing import Any

from vllm.model_executor.quantization.base import (QuantizationConfig, QuantizationError,
                                                   matches_module_pattern)
from vllm.model_executor.quantization.fp8 import Fp8LinearMethod, Fp8MoEMethod, Fp8Scheme
from vllm.model_executor.quantization.fp8_activation import Fp8ActScheme
from vllm.model_executor.quantization.weight_only import (PackedScheme, WeightOnlyLinearMethod,
                                                          WeightOnlyMoEMethod)

# checkpoint tensors we read past: int4 shapes (implied by the packed
# weight and its scales) and the activation scales of NVFP4 W4A4
_SKIPPED_SUFFIXES = (".weight_shape", ".input_global_scale")


def _describe(scheme) -> str:
    def args(a):
        if a is None:
            return "none"
        bits = f"{a.type}{a.num_bits}"
        extra = f" group {a.group_size}" if a.group_size else ""
        extra += f" block {a.block_structure}" if a.block_structure else ""
        dyn = " dynamic" if a.dynamic else " static"
        return f"{bits} {a.strategy}{extra}{dyn}{'' if a.symmetric else ' asymmetric'}"
    return f"weights {args(scheme.weights)}, input activations {args(scheme.input_activations)}"


class CompressedTensorsConfig(QuantizationConfig):
    name = "compressed-tensors"

    def __init__(self, architecture: str, cfg: dict[str, Any]):
        super().__init__(architecture)
        try:
            from compressed_tensors.quantization import QuantizationConfig as CTConfig
        except ImportError as e:  # pragma: no cover - a dependency
            raise QuantizationError("compressed-tensors checkpoints need the "
                                    "`compressed-tensors` package") from e
        cfg = {k: v for k, v in cfg.items() if k not in ("sparsity_config", "transform_config",
                                                         "version")}
        try:
            self.ct = CTConfig.model_validate(cfg)
        except Exception as e:
            raise QuantizationError(f"compressed-tensors: cannot parse quantization_config: {e}") \
                from e
        if self.ct.kv_cache_scheme is not None:
            raise QuantizationError("compressed-tensors: KV cache quantization (kv_cache_scheme) "
                                    "is not supported")
        self.ignore = list(self.ct.ignore or [])
        self._schemes: dict[str, Any] = {}   # group name -> our scheme (checked lazily)

    # -- matching ---------------------------------------------------------------
    def _group_for(self, name: str) -> str | None:
        """The config group whose targets match checkpoint module ``name``
        (a module name beats a regex beats a class name), None if ignored
        or unmatched."""
        if any(matches_module_pattern(name, p) for p in self.ignore):
            return None
        best = None
        for group, scheme in self.ct.config_groups.items():
            for t in scheme.targets:
                if t.startswith("re:"):
                    rank = 1 if re.match(t[3:], name) else None
                elif t in ("Linear", "torch.nn.Linear"):
                    rank = 2
                else:
                    rank = 0 if matches_module_pattern(name, t) else None
                if rank is not None and (best is None or rank < best[0]):
                    best = (rank, group)
        return None if best is None else best[1]

    def _scheme_of(self, prefix: str):
        groups = {n: self._group_for(n) for n in self.checkpoint_modules(prefix)}
        if not self.resolve(prefix, lambda n: groups[n] is not None):
            return None
        found = set(groups.values())
        if len(found) > 1:
            raise QuantizationError(f"compressed-tensors: {prefix} fuses modules of different "
                                    f"config groups ({', '.join(sorted(found))})")
        group = found.pop()
        if group not in self._schemes:
            self._schemes[group] = self._convert(self.ct.config_groups[group])
        return self._schemes[group]

    def _convert(self, scheme):
        w, a = scheme.weights, scheme.input_activations
        fmt = scheme.format or self.ct.format
        what = f"compressed-tensors scheme ({_describe(scheme)}, format {fmt})"
        if w is None or scheme.output_activations is not None:
            raise QuantizationError(f"{what} is not supported")
        if w.type == "float" and w.num_bits == 8:
            if w.strategy not in ("tensor", "channel", "block") or not w.symmetric or w.dynamic:
                raise QuantizationError(f"{what} is not supported")
            act = None
            if a is not None:
                if a.type != "float" or a.num_bits != 8 or not a.symmetric:
                    raise QuantizationError(f"{what} is not supported")
                if not a.dynamic and a.strategy == "tensor":
                    act = Fp8ActScheme("static")
                elif a.dynamic and a.strategy in ("token", "tensor"):
                    act = Fp8ActScheme(a.strategy)
                elif a.dynamic and a.strategy == "group" and w.strategy == "block" \
                        and a.group_size == w.block_structure[1]:
                    act = Fp8ActScheme("group", a.group_size)
                else:
                    raise QuantizationError(f"{what} is not supported")
            block = tuple(w.block_structure) if w.strategy == "block" else None
            return Fp8Scheme(w.strategy, act, block, "weight_scale")
        if a is not None and not (w.type == "float" and w.num_bits == 4):
            raise QuantizationError(f"{what} is not supported (weight-only INT4 only)")
        if w.type == "int" and w.num_bits == 4 and w.strategy == "group":
            if not w.symmetric:
                raise QuantizationError(f"{what} is not supported (asymmetric INT4)")
            if fmt != "pack-quantized":
                raise QuantizationError(f"{what} is not supported (INT4 needs pack-quantized)")
            return PackedScheme("int4", w.group_size, "weight_packed", "weight_scale")
        if w.type == "float" and w.num_bits == 4 and w.strategy == "tensor_group" \
                and w.group_size == 16 and fmt == "nvfp4-pack-quantized":
            return PackedScheme("nvfp4", 16, "weight_packed", "weight_scale",
                                global_name="weight_global_scale", global_is_divisor=True)
        raise QuantizationError(f"{what} is not supported")

    # -- QuantizationConfig --------------------------------------------------------
    def linear_method(self, prefix):
        scheme = self._scheme_of(prefix)
        if scheme is None:
            return None
        if isinstance(scheme, Fp8Scheme):
            return Fp8LinearMethod(scheme)
        return WeightOnlyLinearMethod(scheme)

    def moe_method(self, prefix):
        scheme = self._scheme_of(prefix)
        if scheme is None:
            return None
        if isinstance(scheme, Fp8Scheme):
            return Fp8MoEMethod(scheme)
        return WeightOnlyMoEMethod(scheme)

    def skip_checkpoint_key(self, name: str) -> bool:
        return name.endswith(_SKIPPED_SUFFIXES)
