"""Experts backend selection.

Each experts class declares what it can run (``unsupported_reason``),
whether it adds LoRA (``supports_lora``) and a priority. With LoRA enabled
only LoRA-capable backends are eligible: ``auto`` never picks another, and
naming one explicitly stops start-up with the list of those that can.
"""
from __future__ import annotations

import functools

from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig
from vllm.model_executor.layers.fused_moe.experts.base import FusedMoEExperts

logger = init_logger(__name__)


class MoEBackendError(ValueError):
    """No experts backend can run this layer as configured."""


def unquantized_backends() -> tuple[type[FusedMoEExperts], ...]:
    from vllm.model_executor.layers.fused_moe.experts.grouped_mm import GroupedMMExperts
    from vllm.model_executor.layers.fused_moe.experts.torch_ref import TorchReferenceExperts
    from vllm.model_executor.layers.fused_moe.experts.triton import TritonExperts
    return (TritonExperts, GroupedMMExperts, TorchReferenceExperts)


def fp8_backends() -> tuple[type[FusedMoEExperts], ...]:
    """FP8 experts (W8A8 per-channel / block, and weight-only W8A16)."""
    from vllm.model_executor.layers.fused_moe.experts.torch_quantized import TorchFp8Experts
    from vllm.model_executor.layers.fused_moe.experts.triton_fp8 import TritonFp8Experts
    return (TritonFp8Experts, TorchFp8Experts)


def weight_only_backends() -> tuple[type[FusedMoEExperts], ...]:
    """4-bit weight-only experts (INT4 W4A16, NVFP4, MXFP4) on unquantized activations."""
    from vllm.model_executor.layers.fused_moe.experts.torch_quantized import (
        TorchWeightOnlyExperts)
    from vllm.model_executor.layers.fused_moe.experts.triton_weight_only import (
        TritonWeightOnlyExperts)
    return (TritonWeightOnlyExperts, TorchWeightOnlyExperts)


def all_experts_backends() -> list[type[FusedMoEExperts]]:
    """Every experts class of every scheme (for conformance tests and docs)."""
    return list(dict.fromkeys(unquantized_backends() + fp8_backends()
                              + weight_only_backends()))


@functools.lru_cache(maxsize=None)
def select_experts_backend(moe: FusedMoEConfig, candidates: tuple[type[FusedMoEExperts], ...],
                           requested: str, lora_enabled: bool) -> type[FusedMoEExperts]:
    """Cached per configuration, so each distinct choice is logged once."""
    by_name = {c.name: c for c in candidates}
    reasons = {c.name: c.unsupported_reason(moe) for c in candidates}
    lora_capable = [c.name for c in candidates if c.supports_lora() and reasons[c.name] is None]
    scheme = moe.quant_scheme
    if requested != "auto":
        if requested not in by_name:
            raise MoEBackendError(f"unknown --moe-backend {requested!r} for {scheme} experts; "
                                  f"choose from auto, {', '.join(by_name)}")
        if reasons[requested] is not None:
            raise MoEBackendError(f"--moe-backend {requested} cannot run {scheme} experts here: "
                                  f"{reasons[requested]}")
        if lora_enabled and not by_name[requested].supports_lora():
            raise MoEBackendError(f"--moe-backend {requested} cannot run LoRA adapters; with "
                                  f"--enable-lora use one of: {', '.join(lora_capable) or 'none'}")
        chosen = by_name[requested]
    else:
        eligible = [c for c in candidates if reasons[c.name] is None
                    and (not lora_enabled or c.supports_lora())]
        if not eligible:
            detail = "; ".join(f"{n}: {r or 'no LoRA support'}" for n, r in reasons.items())
            raise MoEBackendError(f"no experts backend can run {scheme} experts"
                                  f"{' with LoRA' if lora_enabled else ''} here ({detail})")
        chosen = max(eligible, key=lambda c: c.priority)
    logger.info("MoE experts backend for %s (lora=%s): %s; candidates: %s", scheme, lora_enabled,
                chosen.name, ", ".join(f"{n}{'' if r is None else ' (' + r + ')'}"
                                       for n, r in reasons.items()))
    return chosen
