"""Workers as local processes: one spawned (not forked) process per rank
beyond the driver, meeting on a local TCP rendezvous."""
from __future__ import annotations

import multiprocessing
import socket

from vllm.config import VllmConfig
from vllm.executor.distributed import DistributedExecutor, WorkerDiedError  # noqa: F401
from vllm.worker import worker


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class MultiprocExecutor(DistributedExecutor):
    def start_workers(self, config: VllmConfig, world_size: int) -> str:
        init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = multiprocessing.get_context("spawn")
        self.workers = [ctx.Process(target=worker.worker_main, name=f"vllm-worker-{rank}",
                                    args=(config, rank, world_size, init_method), daemon=True)
                        for rank in range(1, world_size)]
        for proc in self.workers:
            proc.start()
        return init_method

    def dead_worker(self) -> str | None:
        for rank, proc in enumerate(self.workers, start=1):
            if not proc.is_alive():
                return f"worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
        return None

    def stop_workers(self) -> None:
        for proc in self.workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
