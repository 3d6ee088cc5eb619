"""The README demo: `vllm serve` a tiny Mixture-of-Experts model with two
LoRA adapters and ask it through the official OpenAI client.

    python -m vllm.tools.demo

The model (demo/assets, made by ``python -m vllm.tools.demo_train``) was
trained to answer ``word: <w>`` with the word itself; the adapter ``upper``
(LoRA on attention and on the routed experts) answers in capitals, and
``reverse`` spells the word backwards. The words asked here were held out
of training. One server, one batch of requests, each naming its own
adapter (or none).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm.tools.demo_train import expected_answer, held_out_words, make_prompt

SERVED = "tiny-moe"
ADAPTERS = ("upper", "reverse")


def assets_dir() -> Path:
    """The shipped assets in a source checkout; otherwise train them (about 3 minutes)."""
    shipped = Path(__file__).resolve().parents[2] / "demo" / "assets"
    if (shipped / "model" / "config.json").is_file():
        return shipped
    out = Path(tempfile.gettempdir()) / "vllm-demo-assets"
    if not (out / "model" / "config.json").is_file():
        print("demo assets not found; training them now (about 3 minutes on 2 CPU cores)")
        subprocess.run([sys.executable, "-m", "vllm.tools.demo_train", "--out", str(out)],
                       check=True)
    return out


def start_server(assets: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(assets / "model"),
           "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "128", "--enable-lora", "--max-loras", "2",
           "--max-lora-rank", "16", "--uvicorn-log-level", "warning",
           "--lora-modules", *[f"{name}={assets / 'adapters' / name}" for name in ADAPTERS]]
    # one compute thread: the server and this client share a small machine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print("$ vllm serve " + " ".join(cmd[4:]))
    return subprocess.Popen(cmd, env=env)


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not become healthy in time")


def main() -> None:
    from openai import OpenAI

    from vllm.executor.multiproc import free_port
    assets = assets_dir()
    port = free_port()
    server = start_server(assets, port)
    try:
        wait_healthy(server, port)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        print("\nmodels served:", ", ".join(
            f"{m.id}" + (f" (adapter of {m.parent})" if getattr(m, "parent", None) else "")
            for m in client.models.list().data))
        words = held_out_words(str(assets))[:8]
        names = [SERVED, *ADAPTERS]

        def ask(job: tuple[str, str]) -> str:
            word, model = job
            reply = client.completions.create(model=model, prompt=make_prompt(word),
                                              max_tokens=16, temperature=0)
            return reply.choices[0].text

        jobs = [(w, m) for w in words for m in names]
        with ThreadPoolExecutor(len(jobs)) as pool:  # concurrent: one mixed-adapter batch
            answers = dict(zip(jobs, pool.map(ask, jobs)))
        print(f"\n{'prompt':<18}" + "".join(f"{n:<14}" for n in ["base model", *ADAPTERS]))
        correct = 0
        for word in words:
            row = f"{make_prompt(word).strip():<18}"
            for model, adapter in zip(names, [None, *ADAPTERS]):
                text = answers[(word, model)]
                ok = text == expected_answer(word, adapter)
                correct += ok
                row += f"{text + ('' if ok else ' (!)'):<14}"
            print(row)
        print(f"\n{correct}/{len(jobs)} answers as trained; words unseen in training. "
              f"Same server, same base weights; the adapter is chosen per request by `model`.")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
