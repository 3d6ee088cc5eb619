"""The driver side of every multi-rank executor.

Rank 0 lives in the engine's process; the other ranks run
``vllm.worker.worker.worker_main`` wherever a backend starts them (local
processes, Ray actors). Each step's inputs and adapter commands are
broadcast over the CPU process group. A monitor thread watches the
workers: if one dies, the next call fails with ``WorkerDiedError`` naming
it; should the driver be stuck in a collective that never returns (NCCL
does not notice dead peers quickly), the monitor ends the process after a
grace period instead of letting it hang.
"""
from __future__ import annotations

import os
import threading
import time
from abc import abstractmethod

import torch

from vllm.config import VllmConfig
from vllm.distributed.parallel_state import (abort_distributed, destroy_distributed,
                                             init_distributed)
from vllm.executor.base import Executor
from vllm.logger import init_logger
from vllm.worker import worker
from vllm.worker.model_runner import ModelRunner

logger = init_logger(__name__)

_GRACE_S = 30.0


class WorkerDiedError(RuntimeError):
    """A worker of the engine is gone; the engine cannot continue."""


class DistributedExecutor(Executor):
    def __init__(self, config: VllmConfig, progress: bool = True):
        if torch.distributed.is_initialized():
            raise RuntimeError("another multi-rank engine is running in this process; shut it "
                               "down (LLMEngine.shutdown) before starting a new one")
        self._stopping = False
        self._dead: str | None = None
        self._sent_loras: dict[int, str] = {}
        world = config.parallel_config.world_size
        init_method = self.start_workers(config, world)
        threading.Thread(target=self._monitor, name="vllm-worker-monitor", daemon=True).start()
        self.group = init_distributed(0, world, config.device_config.device, init_method)
        self.driver = ModelRunner(config, worker.parallel_context(config, self.group), progress)

    # -- what a backend provides ------------------------------------------------------
    @abstractmethod
    def start_workers(self, config: VllmConfig, world_size: int) -> str:
        """Start ranks 1..world_size-1 running ``worker.worker_main``; return
        the rendezvous address (``tcp://host:port``) they were given."""

    @abstractmethod
    def dead_worker(self) -> str | None:
        """A description of a worker that has stopped, if any."""

    @abstractmethod
    def stop_workers(self) -> None:
        """Wait briefly for the workers to exit, then force them."""

    # -- the driver ---------------------------------------------------------------------
    def _monitor(self) -> None:
        while not self._stopping:
            dead = self.dead_worker()
            if dead is not None and not self._stopping:
                self._dead = f"{dead}; the engine cannot continue"
                logger.error(self._dead)
                deadline = time.monotonic() + _GRACE_S
                while not self._stopping and time.monotonic() < deadline:
                    time.sleep(0.2)
                if not self._stopping:  # the driver never noticed: do not hang
                    logger.error("driver still blocked %ds after a worker died; exiting", _GRACE_S)
                    os._exit(1)
                return
            time.sleep(0.5)

    def _command(self, command: str, arg: object = None) -> None:
        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        self._guard(self.group.broadcast_object, (command, arg))

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as e:  # gloo reports closed peers
            time.sleep(1.0)  # give the monitor time to name the worker
            if self._dead is not None or self.dead_worker() is not None:
                self._stopping = True
                raise WorkerDiedError(self._dead or self.dead_worker()) from e
            raise

    def initialize_cache(self) -> int:
        return self._guard(worker.initialize_cache, self.driver, self.group)

    def execute(self, inp, sampling):
        self._command(worker.EXECUTE, inp)
        return self._guard(self.driver.execute, inp, sampling)

    def add_lora(self, request):
        self.driver.add_lora(request)  # validates; raises before the workers see it
        if self._sent_loras.get(request.lora_int_id) != request.lora_path:
            self._command(worker.ADD_LORA, request)
            self._sent_loras[request.lora_int_id] = request.lora_path

    def remove_lora(self, lora_int_id):
        self._command(worker.REMOVE_LORA, lora_int_id)
        self._sent_loras.pop(lora_int_id, None)
        return self.driver.remove_lora(lora_int_id)

    def shutdown(self) -> None:
        if self._stopping and self._dead is None:
            return
        graceful = self._dead is None
        if graceful:
            try:
                self._command(worker.SHUTDOWN)
            except (WorkerDiedError, RuntimeError):
                graceful = False
        self._stopping = True
        self.driver.release_cuda_graphs()
        # Every rank tears the groups down together; after a worker died the
        # teardown would wait for the lost peer, so the groups are aborted.
        try:
            if graceful:
                destroy_distributed()
            else:
                abort_distributed()
        finally:
            self.stop_workers()
