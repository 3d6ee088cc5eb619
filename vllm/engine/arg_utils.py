"""EngineArgs: every engine flag, its CLI spelling and its validation."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from vllm.config import (CacheConfig, ConfigError, DeviceConfig, KernelConfig, LoRAConfig,
                         ModelConfig, ParallelConfig, SchedulerConfig, VllmConfig)


def _nullable_int(value: str) -> int | None:
    return None if value.lower() in ("none", "null") else int(value)


@dataclass
class EngineArgs:
    """Arguments of ``LLM(...)`` and ``vllm serve``; field names match the
    CLI flags (``max_model_len`` <-> ``--max-model-len``) as upstream."""
    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    enforce_eager: bool = False
    async_scheduling: bool | None = None
    moe_backend: str = "auto"
    attention_backend: str = "auto"
    served_model_name: str | list[str] | None = None
    quantization: str | None = None
    max_logprobs: int = 20
    # LoRA
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    lora_dtype: str = "auto"
    fully_sharded_loras: bool = False
    # parallelism
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    expert_placement_strategy: str = "linear"
    distributed_executor_backend: str | None = None

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        add = parser.add_argument
        add("--tokenizer", type=str, default=None,
            help="tokenizer directory (default: the model directory)")
        add("--dtype", type=str, default="auto",
            choices=["auto", "float32", "float", "float16", "half", "bfloat16"],
            help="weight and activation dtype; auto keeps the checkpoint's (float32 "
                 "checkpoints run in bfloat16 on GPUs)")
        add("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"])
        add("--seed", type=int, default=0)
        add("--max-model-len", type=_nullable_int, default=None,
            help="context length (default: the model's max_position_embeddings)")
        add("--max-num-seqs", type=int, default=256, help="sequences per step at most")
        add("--max-num-batched-tokens", type=_nullable_int, default=None,
            help="tokens per step at most; prefills are chunked to fit (default 8192)")
        add("--block-size", type=int, default=16, help="tokens per KV-cache block")
        add("--gpu-memory-utilization", type=float, default=0.9,
            help="fraction of GPU memory for weights, activations and the KV cache")
        add("--num-gpu-blocks-override", type=_nullable_int, default=None,
            help="use exactly this many KV-cache blocks (testing)")
        add("--enforce-eager", action="store_true", help="never capture CUDA graphs")
        add("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
            help="schedule step n+1 while the GPU runs step n (default: on for one GPU; "
                 "needs a single rank)")
        add("--moe-backend", type=str, default="auto",
            help="MoE experts backend: auto, or a backend name (torch, triton, grouped_mm, ...)")
        add("--attention-backend", type=str, default="auto", choices=["auto", "torch", "triton"])
        add("--served-model-name", type=str, nargs="+", default=None,
            help="model name(s) in the API (default: the model path)")
        add("--max-logprobs", type=int, default=20,
            help="largest logprobs / prompt_logprobs a request may ask for")
        add("--quantization", "-q", type=str, default=None,
            help="quantization method (default: read from the checkpoint)")
        add("--enable-lora", action="store_true", help="serve LoRA adapters")
        add("--max-loras", type=int, default=1, help="adapters in one batch at most")
        add("--max-lora-rank", type=int, default=16, help="largest adapter rank accepted")
        add("--max-cpu-loras", type=_nullable_int, default=None,
            help="adapters cached in CPU memory (default: --max-loras)")
        add("--lora-dtype", type=str, default="auto",
            choices=["auto", "float32", "float16", "bfloat16"])
        add("--fully-sharded-loras", action="store_true",
            help="shard both LoRA factors across tensor-parallel ranks")
        add("--tensor-parallel-size", "-tp", type=int, default=1)
        add("--enable-expert-parallel", action="store_true",
            help="split MoE experts across ranks instead of each expert's weights")
        add("--expert-placement-strategy", type=str, default="linear",
            choices=["linear", "round_robin"])
        add("--distributed-executor-backend", type=str, default=None, choices=["mp", "ray"])
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})

    def create_engine_config(self) -> VllmConfig:
        device = DeviceConfig.create(self.device)
        names = self.served_model_name
        if isinstance(names, list):
            names = names[0] if names else None
        model = ModelConfig.create(self.model, self.tokenizer, self.dtype, self.max_model_len,
                                   self.seed, names, device.device, self.enforce_eager,
                                   self.quantization, self.max_logprobs)
        cache = CacheConfig(self.block_size, self.gpu_memory_utilization,
                            self.num_gpu_blocks_override)
        cache.validate()
        parallel = ParallelConfig(self.tensor_parallel_size, self.enable_expert_parallel,
                                  self.expert_placement_strategy,
                                  self.distributed_executor_backend)
        parallel.validate()
        async_scheduling = self.async_scheduling
        if async_scheduling is None:
            # on the CPU the step runs on the host anyway: nothing to hide
            async_scheduling = device.device == "cuda" and parallel.world_size == 1
        elif async_scheduling and parallel.world_size > 1:
            raise ConfigError("--async-scheduling needs a single rank (the next step's "
                              "input tokens stay on the sampling GPU)")
        sched = SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens or 8192,
                                async_scheduling)
        sched.validate()
        kernel = KernelConfig(self.moe_backend, self.attention_backend)
        if kernel.attention_backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"unknown --attention-backend {kernel.attention_backend!r}; "
                              "choose from auto, torch, triton")
        lora = None
        if self.enable_lora:
            lora = LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras,
                              self.lora_dtype, self.fully_sharded_loras)
            lora.validate(model.dtype, parallel.tensor_parallel_size)
        return VllmConfig(model, device, cache, sched, parallel, kernel, lora)
