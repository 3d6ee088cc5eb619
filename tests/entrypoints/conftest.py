"""Fixtures for the API server tests: a tiny MoE model, LoRA adapters, the
offline ``LLM`` with the server's settings (the reference), and ``vllm
serve`` in a subprocess on a free local port."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx2
import openai
import pytest
import torch

from tests.lora_utils import write_peft_3d_adapter, write_per_expert_adapter
from tests.utils import model_dir
from vllm.lora.request import LoRARequest

API_KEY = "test-key"
MAX_MODEL_LEN = 256
# the offline reference and the server run with exactly these settings
ENGINE_KWARGS = dict(dtype="float32", max_model_len=MAX_MODEL_LEN, enable_lora=True, max_loras=2,
                     max_lora_rank=16)
ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enable-lora",
                "--max-loras", "2", "--max-lora-rank", "16"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The server subprocess and the test process (the offline reference) share
# the machine: with one compute thread each, their OpenMP thread pools do
# not spin against each other (on 2 busy cores that is a 50x slowdown).
THREADS_ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="package", autouse=True)
def one_compute_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteServer:
    """``vllm serve ARGS`` in a subprocess; output goes to a log file that is
    shown when start-up fails."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 api_key: str | None = None, timeout: float = 120.0):
        self.port = free_port()
        self.api_key = api_key
        self.log = tempfile.NamedTemporaryFile("w+", prefix="vllm-serve-", suffix=".log",
                                               delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", *args,
             "--host", "127.0.0.1", "--port", str(self.port), "--disable-uvicorn-access-log"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, **THREADS_ENV, **(env or {})})
        self._wait_healthy(timeout)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx2.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx2.HTTPError:
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"server did not start in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()[-5000:]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none",
                             max_retries=0)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none",
                                  max_retries=0)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> str:
    return model_dir(str(tmp_path_factory.getbasetemp()), "qwen3_moe")


@pytest.fixture(scope="session")
def adapters(model_path, tmp_path_factory) -> dict[str, str]:
    """Three adapters served from the start (more than --max-loras 2) and one
    loaded at run time; different formats and ranks."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a0": write_per_expert_adapter(model_path, str(root / "a0"), seed=1),
        "a1": write_peft_3d_adapter(model_path, str(root / "a1"), seed=2),
        "a2": write_per_expert_adapter(model_path, str(root / "a2"), seed=3, rank=16,
                                       attention=("o_proj",)),
        "runtime": write_peft_3d_adapter(model_path, str(root / "runtime"), seed=4, rank=8,
                                         attention=("k_proj",)),
    }


@pytest.fixture(scope="session")
def lora_requests(adapters) -> dict[str, LoRARequest]:
    """The offline engine's LoRARequest for each adapter name."""
    return {name: LoRARequest(name, i, path) for i, (name, path) in
            enumerate(adapters.items(), start=1)}


@pytest.fixture(scope="session")
def offline(model_path):
    from vllm import LLM
    return LLM(model_path, **ENGINE_KWARGS)
