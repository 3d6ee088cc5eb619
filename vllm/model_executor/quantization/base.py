"""The quantization config interface and what every scheme shares: errors,
and matching checkpoint ignore lists against our module names.

A ``QuantizationConfig`` is built from a checkpoint's
``quantization_config`` (see ``__init__.get_quantization_config``) and
answers, per module, which quant method builds it: ``linear_method(prefix)``
for linear layers and ``moe_method(prefix)`` for routed experts, ``None``
for modules that stay unquantized. Prefixes are our module names
(``model.layers.0.self_attn.qkv_proj``, ``model.layers.1.mlp.experts``);
checkpoints name modules the Hugging Face way (``q_proj``, ``mlp.gate``,
``block_sparse_moe.experts.0.w1``), so each prefix is translated into the
checkpoint modules it is made of before matching (a fused ``qkv_proj`` is
quantized iff its q/k/v are; experts iff their projections are).
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any


class QuantizationError(ValueError):
    """A quantized checkpoint the engine cannot run (names the scheme)."""


class QuantizationConfig(ABC):
    #: the checkpoint's ``quant_method`` spelling (``fp8``, ``compressed-tensors``, ...)
    name: str = ""

    def __init__(self, architecture: str):
        self.architecture = architecture

    @abstractmethod
    def linear_method(self, prefix: str):
        """LinearMethodBase for the linear layer ``prefix``, or None (unquantized)."""

    @abstractmethod
    def moe_method(self, prefix: str):
        """FusedMoEMethodBase for the experts ``prefix``, or None (unquantized)."""

    def skip_checkpoint_key(self, name: str) -> bool:
        """Checkpoint tensors this scheme carries but the engine does not use."""
        return False

    # -- module names -------------------------------------------------------------
    def checkpoint_modules(self, prefix: str) -> list[str]:
        return checkpoint_modules(self.architecture, prefix)

    def resolve(self, prefix: str, is_quantized) -> bool:
        """Whether every checkpoint module behind ``prefix`` is quantized per
        ``is_quantized(name)``; a fused module half quantized is an error."""
        names = self.checkpoint_modules(prefix)
        flags = {n: bool(is_quantized(n)) for n in names}
        if all(flags.values()):
            return True
        if not any(flags.values()):
            return False
        raise QuantizationError(
            f"{self.name}: {prefix} fuses modules of which only some are quantized "
            f"({', '.join(n for n, q in flags.items() if q)} but not "
            f"{', '.join(n for n, q in flags.items() if not q)}); this is not supported")


def checkpoint_modules(architecture: str, prefix: str) -> list[str]:
    """The checkpoint module names our module ``prefix`` is loaded from:
    renames undone, fused projections split into their parts, routed
    experts represented by expert 0's projections."""
    from vllm.model_executor.models.registry import model_class
    cls = model_class(architecture)
    name = prefix
    for old, new in reversed(cls.checkpoint_renames):
        if new.endswith(".") and old.endswith("."):
            name = name.replace(new, old)
    owner, _, leaf = name.rpartition(".")
    if leaf == "experts":
        return [f"{name}.0.{proj}" for proj in cls.expert_shards]
    parts = cls.packed_modules_mapping.get(leaf)
    if parts:
        return [f"{owner}.{p}" for p in parts]
    return [name]


def matches_module_pattern(name: str, pattern: str) -> bool:
    """compressed-tensors style: ``re:<regex>`` (re.match on the full module
    name), else the name itself or a dotted suffix of it."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def matches_module_path(name: str, pattern: str) -> bool:
    """Hugging Face ``modules_to_not_convert`` style: ``pattern`` (with
    optional ``*`` wildcards) names the module, one of its parents, or a
    dotted run of names inside it (``mlp.shared_experts``)."""
    if "*" in pattern:
        return matches_glob(name, pattern)
    padded = f".{name}."
    return f".{pattern}." in padded


def matches_glob(name: str, pattern: str) -> bool:
    """ModelOpt / GPT-OSS style ``*`` wildcards, matching the module or any
    of its parents (``model.layers.*.self_attn`` covers its projections)."""
    regex = re.escape(pattern).replace(r"\*", ".*")
    parts = name.split(".")
    return any(re.fullmatch(regex, ".".join(parts[:i])) for i in range(1, len(parts) + 1))


def get_field(cfg: dict[str, Any], *names: str, default=None):
    for n in names:
        if n in cfg and cfg[n] is not None:
            return cfg[n]
    return default
