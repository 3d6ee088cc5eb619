"""One worker process per tensor-parallel rank beyond the driver.

Processes are spawned (not forked), join a torch.distributed group (gloo on
CPU, NCCL on GPU) over a local TCP rendezvous, and receive each step's
inputs as a broadcast from the driver. A monitor thread watches the
workers: if one dies, the next step fails with ``WorkerDiedError`` naming
it; should the driver be stuck in a collective that never returns (NCCL
does not notice dead peers quickly), the monitor ends the process after a
grace period instead of letting it hang.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time

import torch

from vllm.config import VllmConfig
from vllm.distributed.parallel_state import destroy_distributed, init_distributed
from vllm.executor.base import Executor
from vllm.logger import init_logger
from vllm.worker import worker
from vllm.worker.model_runner import ModelRunner

logger = init_logger(__name__)

_GRACE_S = 30.0


class WorkerDiedError(RuntimeError):
    """A worker process of the engine is gone; the engine cannot continue."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiprocExecutor(Executor):
    def __init__(self, config: VllmConfig, progress: bool = True):
        world = config.parallel_config.world_size
        if torch.distributed.is_initialized():
            raise RuntimeError("another multi-rank engine is running in this process; shut it "
                               "down (LLMEngine.shutdown) before starting a new one")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = multiprocessing.get_context("spawn")
        self.workers = [ctx.Process(target=worker.worker_main, name=f"vllm-worker-{rank}",
                                    args=(config, rank, world, init_method), daemon=True)
                        for rank in range(1, world)]
        for proc in self.workers:
            proc.start()
        self._stopping = False
        self._dead: str | None = None
        self._sent_loras: dict[int, str] = {}
        threading.Thread(target=self._monitor, name="vllm-worker-monitor", daemon=True).start()
        self.group = init_distributed(0, world, config.device_config.device, init_method)
        self.driver = ModelRunner(config, worker.parallel_context(config, self.group), progress)

    def _monitor(self) -> None:
        while not self._stopping:
            for rank, proc in enumerate(self.workers, start=1):
                if not proc.is_alive() and not self._stopping:
                    self._dead = (f"worker rank {rank} (pid {proc.pid}) exited with code "
                                  f"{proc.exitcode}; the engine cannot continue")
                    logger.error(self._dead)
                    deadline = time.monotonic() + _GRACE_S
                    while not self._stopping and time.monotonic() < deadline:
                        time.sleep(0.2)
                    if not self._stopping:  # the driver never noticed: do not hang
                        logger.error("driver still blocked %ds after a worker died; exiting",
                                     _GRACE_S)
                        os._exit(1)
                    return
            time.sleep(0.5)

    def _command(self, command: str, arg: object = None) -> None:
        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        try:
            self.group.broadcast_object((command, arg))
        except RuntimeError as e:  # gloo reports closed peers
            raise WorkerDiedError(self._dead or f"lost contact with a worker: {e}") from e

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as e:
            if self._dead is not None or any(not p.is_alive() for p in self.workers):
                time.sleep(1.0)  # let the monitor name the worker
                self._stopping = True
                raise WorkerDiedError(self._dead or str(e)) from e
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
        if self._stopping:
            return
        if self._dead is None:
            try:
                self._command(worker.SHUTDOWN)
            except WorkerDiedError:
                pass
        self._stopping = True
        for proc in self.workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        destroy_distributed()
