"""A worker process: one tensor-parallel rank other than the driver.

It builds its shard of the model, sizes the KV cache together with the
other ranks, then follows the driver's commands (broadcast over the CPU
process group) until told to stop: run a step, add or remove an adapter.
"""
from __future__ import annotations

import traceback

from vllm.config import VllmConfig
from vllm.distributed.parallel_state import (DeviceGroup, ParallelContext, destroy_distributed,
                                             init_distributed)
from vllm.logger import init_logger
from vllm.worker.model_runner import ModelRunner

logger = init_logger(__name__)

EXECUTE, ADD_LORA, REMOVE_LORA, SHUTDOWN = "execute", "add_lora", "remove_lora", "shutdown"


def parallel_context(config: VllmConfig, group: DeviceGroup) -> ParallelContext:
    pc = config.parallel_config
    return ParallelContext(group, pc.enable_expert_parallel, pc.expert_placement_strategy)


def initialize_cache(runner: ModelRunner, group: DeviceGroup) -> int:
    """The same steps, in the same order, on every rank (the memory profile
    and graph capture run collective forward passes)."""
    num_blocks = group.all_reduce_min(runner.determine_num_blocks())
    runner.init_kv_cache(num_blocks)
    runner.capture_cuda_graphs()
    return num_blocks


def worker_main(config: VllmConfig, rank: int, world_size: int, init_method: str,
                device_index: int | None = None) -> None:
    try:
        group = init_distributed(rank, world_size, config.device_config.device, init_method,
                                 device_index)
        runner = ModelRunner(config, parallel_context(config, group), progress=False)
        initialize_cache(runner, group)
        while True:
            command, arg = group.broadcast_object()
            if command == EXECUTE:
                runner.execute(arg, None, is_driver=False)
            elif command == ADD_LORA:
                runner.add_lora(arg)
            elif command == REMOVE_LORA:
                runner.remove_lora(arg)
            elif command == SHUTDOWN:
                runner.release_cuda_graphs()
                destroy_distributed()  # with the driver: NCCL teardown needs every rank
                return
    except Exception:
        logger.error("worker rank %d failed:\n%s", rank, traceback.format_exc())
        raise
