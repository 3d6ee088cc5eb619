"""Engine configuration: one dataclass per concern, gathered in VllmConfig.

Values are validated here, so every entry point (EngineArgs, LLM(...),
``vllm serve``) rejects bad input with the same message.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


class ConfigError(ValueError):
    """A configuration value that the engine cannot run with."""


@dataclass
class ModelConfig:
    """The model to serve: checkpoint location, HF config, dtype, limits."""
    model: str
    tokenizer: str
    dtype: torch.dtype
    max_model_len: int
    seed: int
    served_model_name: str
    hf_config: Any
    enforce_eager: bool = False
    quantization: str | None = None
    max_logprobs: int = 20

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or []
        if not archs:
            raise ConfigError(f"{self.model}/config.json names no `architectures`")
        return archs[0]

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @staticmethod
    def create(model: str, tokenizer: str | None, dtype: str, max_model_len: int | None,
               seed: int, served_model_name: str | None, device: str,
               enforce_eager: bool = False, quantization: str | None = None,
               max_logprobs: int = 20) -> "ModelConfig":
        from transformers import AutoConfig

        if not os.path.isdir(model):
            raise ConfigError(f"model path {model!r} is not a directory (models are loaded from "
                              "local Hugging Face directories)")
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ConfigError(f"model directory {model!r} has no config.json")
        try:
            hf_config = AutoConfig.from_pretrained(model)
        except Exception as e:  # transformers raises many types; name the file
            raise ConfigError(f"cannot read {model}/config.json: {e}") from e
        torch_dtype = resolve_dtype(dtype, hf_config, device)
        quantization = _resolve_quantization(model, hf_config, quantization)
        derived = _derived_max_len(hf_config)
        if max_model_len is None:
            max_model_len = derived
        elif max_model_len <= 0:
            raise ConfigError(f"--max-model-len must be positive, got {max_model_len}")
        elif max_model_len > derived:
            raise ConfigError(f"--max-model-len {max_model_len} exceeds the model's "
                              f"max_position_embeddings ({derived})")
        return ModelConfig(model=model, tokenizer=tokenizer or model, dtype=torch_dtype,
                           max_model_len=max_model_len, seed=seed,
                           served_model_name=served_model_name or model, hf_config=hf_config,
                           enforce_eager=enforce_eager, quantization=quantization,
                           max_logprobs=max_logprobs)


def resolve_dtype(dtype: str, hf_config: Any, device: str) -> torch.dtype:
    """`auto` keeps the checkpoint dtype, except float32 checkpoints on a GPU
    run in bfloat16 (as upstream); on the CPU float32 stays float32."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ConfigError(f"unknown --dtype {dtype!r}; choose from auto, "
                              + ", ".join(sorted(_DTYPES)))
        return _DTYPES[dtype]
    ckpt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(ckpt, str):
        ckpt = _DTYPES.get(ckpt, torch.float32)
    ckpt = ckpt or torch.float32
    if device == "cuda" and ckpt == torch.float32:
        return torch.bfloat16
    return ckpt


def _resolve_quantization(model: str, hf_config: Any, requested: str | None) -> str | None:
    """The checkpoint's quantization method (``--quantization`` must agree)."""
    from vllm.model_executor.quantization import QuantizationError, resolve_quantization
    try:
        return resolve_quantization(model, hf_config, requested)
    except QuantizationError as e:
        raise ConfigError(str(e)) from e


def _derived_max_len(hf_config: Any) -> int:
    return int(getattr(hf_config, "max_position_embeddings", 4096))


@dataclass
class DeviceConfig:
    device: str  # "cpu" or "cuda"

    @staticmethod
    def create(device: str) -> "DeviceConfig":
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"unknown --device {device!r}; choose from auto, cpu, cuda")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but torch sees no CUDA device")
        return DeviceConfig(device)


@dataclass
class CacheConfig:
    """Paged KV cache: block size and how much memory it may take."""
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    num_blocks: int = 0  # decided by the worker after profiling

    def validate(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ConfigError(f"--block-size must be a power of two in 1..128, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("--gpu-memory-utilization must be in (0, 1], got "
                              f"{self.gpu_memory_utilization}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ConfigError("--num-gpu-blocks-override must be >= 1")


@dataclass
class SchedulerConfig:
    """Continuous batching limits (prefills are chunked to fit the token budget).
    ``async_scheduling``: schedule and launch step n+1 while the device runs
    step n (the host's work hides behind the device's); resolved at engine
    config time, on by default for a single GPU."""
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    async_scheduling: bool = False

    def validate(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"--max-num-seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError("--max-num-batched-tokens must be >= 1, got "
                              f"{self.max_num_batched_tokens}")


@dataclass
class LoRAConfig:
    """Adapter serving limits (vLLM's --max-loras, --max-lora-rank, ...)."""
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    lora_dtype: torch.dtype | str = "auto"
    fully_sharded_loras: bool = False

    def validate(self, model_dtype: torch.dtype, tensor_parallel_size: int = 1) -> None:
        if self.fully_sharded_loras and self.max_lora_rank % tensor_parallel_size:
            raise ConfigError(f"--fully-sharded-loras needs --max-lora-rank "
                              f"({self.max_lora_rank}) divisible by --tensor-parallel-size "
                              f"({tensor_parallel_size})")
        if self.max_loras < 1:
            raise ConfigError(f"--max-loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ConfigError(f"--max-lora-rank must be >= 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        if self.max_cpu_loras < self.max_loras:
            raise ConfigError(f"--max-cpu-loras ({self.max_cpu_loras}) must be >= "
                              f"--max-loras ({self.max_loras})")
        if self.lora_dtype in (None, "auto"):
            self.lora_dtype = model_dtype
        elif isinstance(self.lora_dtype, str):
            if self.lora_dtype not in _DTYPES:
                raise ConfigError(f"unknown --lora-dtype {self.lora_dtype!r}")
            self.lora_dtype = _DTYPES[self.lora_dtype]


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    expert_placement_strategy: str = "linear"
    distributed_executor_backend: str | None = None

    def validate(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.expert_placement_strategy not in ("linear", "round_robin"):
            raise ConfigError("--expert-placement-strategy must be linear or round_robin, got "
                              f"{self.expert_placement_strategy!r}")
        if self.distributed_executor_backend not in (None, "mp", "ray", "uni"):
            raise ConfigError("--distributed-executor-backend must be mp or ray, got "
                              f"{self.distributed_executor_backend!r}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size


@dataclass
class KernelConfig:
    """Which kernel families run: the MoE experts backend and attention backend."""
    moe_backend: str = "auto"
    attention_backend: str = "auto"


@dataclass
class VllmConfig:
    model_config: ModelConfig
    device_config: DeviceConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    kernel_config: KernelConfig = field(default_factory=KernelConfig)
    lora_config: LoRAConfig | None = None


def load_generation_config(model_dir: str) -> dict[str, Any]:
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)
