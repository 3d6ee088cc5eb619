"""Every VLLM_* environment variable the engine reads, in one place.

Read through the module attributes (``vllm.envs.VLLM_LOGGING_LEVEL``); each
access re-reads the environment so tests can change variables at run time.
"""
import os
from typing import Any, Callable


def _bool(name: str, default: bool) -> Callable[[], bool]:
    def read() -> bool:
        value = os.environ.get(name)
        if value is None:
            return default
        return value.strip().lower() in ("1", "true", "yes", "on")
    return read


def _str(name: str, default: str | None) -> Callable[[], str | None]:
    return lambda: os.environ.get(name, default)


environment_variables: dict[str, Callable[[], Any]] = {
    # Logging level of the "vllm" logger (DEBUG, INFO, WARNING, ERROR).
    "VLLM_LOGGING_LEVEL": _str("VLLM_LOGGING_LEVEL", "INFO"),
    # Allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter.
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": _bool("VLLM_ALLOW_RUNTIME_LORA_UPDATING", False),
    # API key for the OpenAI server when --api-key is not given.
    "VLLM_API_KEY": _str("VLLM_API_KEY", None),
    # Implementation of the small MoE bookkeeping ops (pair alignment; on
    # CUDA with "auto" or "native", routing too): "auto" (the native library
    # where it is built, else Triton on CUDA, else torch), "native", "triton"
    # or "torch".
    "VLLM_MOE_OPS_IMPL": _str("VLLM_MOE_OPS_IMPL", "auto"),
    # Where the Triton experts compute MoE LoRA: "auto" (per step size),
    # "gemm" (shrink and expand inside the expert GEMMs), "epilogue" (shrink
    # kernels, expand in the GEMMs' epilogue), "loop" (shrink kernels, expand
    # as extra K steps of the GEMMs) or "off" (separate kernels).
    "VLLM_MOE_LORA_FUSION": _str("VLLM_MOE_LORA_FUSION", "auto"),
    # Up to this many routed (token, expert) pairs the MoE LoRA shrinks of the
    # GEMM-epilogue path run one program per pair, with no slot alignment (the
    # bound for ranks up to 16; above, it shrinks by (16 / rank)^2).
    "VLLM_MOE_LORA_SHRINK_BY_PAIR_MAX_PAIRS": lambda: int(
        os.environ.get("VLLM_MOE_LORA_SHRINK_BY_PAIR_MAX_PAIRS", "256")),
    # Directory holding tuned Triton kernel configurations (overrides the
    # ones shipped in the package).
    "VLLM_TUNED_CONFIG_DIR": _str("VLLM_TUNED_CONFIG_DIR", None),
    # KV-cache size in GiB when running on the CPU.
    "VLLM_CPU_KVCACHE_SPACE": lambda: float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")),
}


def __getattr__(name: str) -> Any:
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(environment_variables)
