"""Executors run one model step on every rank of the engine.

The engine talks to one ``Executor``; rank 0 (the driver) lives in the
engine's process and samples. ``UniprocExecutor`` has only the driver;
``MultiprocExecutor`` adds one worker process per further rank.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from vllm.lora.request import LoRARequest
from vllm.model_executor.layers.sampler import SamplerOutput, SamplingMetadata
from vllm.worker.model_runner import ModelInput, ModelRunner


class Executor(ABC):
    driver: ModelRunner

    @abstractmethod
    def initialize_cache(self) -> int:
        """Size the KV cache on every rank (the smallest any rank can hold),
        allocate it and capture CUDA graphs. Returns the block count."""

    @abstractmethod
    def execute(self, inp: ModelInput, sampling: SamplingMetadata | None) -> SamplerOutput:
        """One step on every rank; the driver's sampled result."""

    @abstractmethod
    def add_lora(self, request: LoRARequest) -> None:
        """Read and validate an adapter on every rank (raises on the driver
        first, so a bad adapter never reaches the workers)."""

    @abstractmethod
    def remove_lora(self, lora_int_id: int) -> bool: ...

    def shutdown(self) -> None:
        return None


class UniprocExecutor(Executor):
    def __init__(self, driver: ModelRunner):
        self.driver = driver

    def initialize_cache(self) -> int:
        num_blocks = self.driver.determine_num_blocks()
        self.driver.init_kv_cache(num_blocks)
        self.driver.capture_cuda_graphs()
        return num_blocks

    def execute(self, inp, sampling):
        return self.driver.execute(inp, sampling)

    def add_lora(self, request):
        self.driver.add_lora(request)

    def remove_lora(self, lora_int_id):
        return self.driver.remove_lora(lora_int_id)
