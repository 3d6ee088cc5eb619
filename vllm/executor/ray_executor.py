"""Workers as Ray actors, for engines spanning several machines.

Each rank beyond the driver is an actor holding one GPU (or one CPU
without CUDA), placed through a Ray placement group; the actors join the
driver's torch.distributed group at the driver node's address. Ray itself
does the scheduling and process management: start a cluster with
``ray start`` (or let ``ray.init`` start a local one) and set
``RAY_ADDRESS`` to join an existing one.
"""
from __future__ import annotations

import os

from vllm.config import VllmConfig
from vllm.executor.distributed import DistributedExecutor
from vllm.executor.multiproc import free_port
from vllm.worker import worker


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError("--distributed-executor-backend ray needs Ray: pip install ray") from e
    return ray


class _RayWorker:
    def run(self, config: VllmConfig, rank: int, world_size: int, init_method: str) -> None:
        # Ray shows each actor only the GPU it was given
        worker.worker_main(config, rank, world_size, init_method, device_index=0)


class RayExecutor(DistributedExecutor):
    def start_workers(self, config: VllmConfig, world_size: int) -> str:
        ray = _import_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                     ignore_reinit_error=True)
        gpu = config.device_config.device == "cuda"
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        self.placement = placement_group([bundle] * (world_size - 1), strategy="PACK")
        ray.get(self.placement.ready())
        host = ray.util.get_node_ip_address()
        init_method = f"tcp://{host}:{free_port(host)}"
        actor = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1)(_RayWorker)
        self.actors = [actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            self.placement, placement_group_bundle_index=i)).remote()
            for i in range(world_size - 1)]
        self.runs = [a.run.remote(config, rank, world_size, init_method)
                     for rank, a in enumerate(self.actors, start=1)]
        return init_method

    def dead_worker(self) -> str | None:
        ray = _import_ray()
        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        for ref in done:
            rank = self.runs.index(ref) + 1
            try:
                ray.get(ref)
                return f"worker rank {rank} (Ray actor) exited"
            except Exception as e:  # the actor died or its loop raised
                return f"worker rank {rank} (Ray actor) failed: {type(e).__name__}: {e}"
        return None

    def stop_workers(self) -> None:
        ray = _import_ray()
        ray.wait(self.runs, num_returns=len(self.runs), timeout=10)
        for actor in self.actors:
            ray.kill(actor)
        ray.util.remove_placement_group(self.placement)
