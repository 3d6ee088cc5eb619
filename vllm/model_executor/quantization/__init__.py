"""Quantized checkpoints: detect the scheme a checkpoint declares and build
the ``QuantizationConfig`` that gives each layer its quant method.

| ``--quantization`` | declared by | modules |
|---|---|---|
| ``fp8`` | config.json ``quant_method: fp8`` | fp8.py |
| ``compressed-tensors`` | config.json ``quant_method: compressed-tensors`` | compressed_tensors.py |
| ``modelopt`` (``modelopt_fp4``) | ``hf_quant_config.json`` or ``quant_method: modelopt`` | modelopt.py |
| ``mxfp4`` | config.json ``quant_method: mxfp4`` (GPT-OSS) | mxfp4.py |
"""
from __future__ import annotations

import json
import os
from typing import Any

from vllm.model_executor.quantization.base import QuantizationConfig, QuantizationError

SUPPORTED_METHODS = ("fp8", "compressed-tensors", "modelopt", "mxfp4")
_ALIASES = {"modelopt_fp4": "modelopt", "compressed_tensors": "compressed-tensors"}


def checkpoint_quantization(model_dir: str, hf_config: Any) -> tuple[str | None, dict | None]:
    """(method, its config dict) that the checkpoint declares, or (None, None)."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is not None:
        if not isinstance(qc, dict):
            qc = qc.to_dict()
        method = str(qc.get("quant_method", "")).lower()
        return _ALIASES.get(method, method), qc
    path = os.path.join(model_dir, "hf_quant_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            data = json.load(f)
        return "modelopt", data.get("quantization", data)
    return None, None


def resolve_quantization(model_dir: str, hf_config: Any, requested: str | None) -> str | None:
    """The method to run with: the checkpoint's; ``requested`` (the
    ``--quantization`` flag) must agree with it."""
    method, _ = checkpoint_quantization(model_dir, hf_config)
    req = _ALIASES.get(requested, requested) if requested else None
    if method is None:
        if req is not None:
            raise QuantizationError(f"--quantization {requested}: the checkpoint is not "
                                    "quantized (quantizing at load time is not supported; "
                                    "see `python -m vllm.tools.quantize`)")
        return None
    if method not in SUPPORTED_METHODS:
        raise QuantizationError(f"quantization method {method!r} is not supported; supported: "
                                f"{', '.join(SUPPORTED_METHODS)}")
    if req is not None and req != method:
        raise QuantizationError(f"--quantization {requested} does not match the checkpoint's "
                                f"quantization method {method!r}")
    return method


def get_quantization_config(model_dir: str, hf_config: Any,
                            architecture: str) -> QuantizationConfig | None:
    method, cfg = checkpoint_quantization(model_dir, hf_config)
    if method is None:
        return None
    if method == "fp8":
        from vllm.model_executor.quantization.fp8 import Fp8Config
        return Fp8Config(architecture, cfg)
    if method == "compressed-tensors":
        from vllm.model_executor.quantization.compressed_tensors import CompressedTensorsConfig
        return CompressedTensorsConfig(architecture, cfg)
    if method == "modelopt":
        from vllm.model_executor.quantization.modelopt import ModelOptConfig
        return ModelOptConfig(architecture, cfg)
    if method == "mxfp4":
        from vllm.model_executor.quantization.mxfp4 import Mxfp4Config
        return Mxfp4Config(architecture, cfg)
    raise QuantizationError(f"quantization method {method!r} is not supported; supported: "
                            f"{', '.join(SUPPORTED_METHODS)}")


__all__ = ["QuantizationConfig", "QuantizationError", "SUPPORTED_METHODS",
           "checkpoint_quantization", "get_quantization_config", "resolve_quantization"]
