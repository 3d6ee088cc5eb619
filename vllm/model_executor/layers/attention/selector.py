"""Picks the attention backend: Triton on CUDA, the torch reference otherwise."""
from __future__ import annotations

from vllm.logger import init_logger
from vllm.model_executor.layers.attention.backend import AttentionBackend
from vllm.triton_utils import has_triton

logger = init_logger(__name__)


def get_attention_backend(name: str, device: str) -> AttentionBackend:
    from vllm.model_executor.layers.attention.torch_ref import TorchAttentionBackend
    if name == "auto":
        name = "triton" if device == "cuda" and has_triton() else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        if device != "cuda":
            raise ValueError("attention backend 'triton' needs a CUDA device")
        from vllm.model_executor.layers.attention.triton_paged import TritonAttentionBackend
        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose from auto, torch, triton")

