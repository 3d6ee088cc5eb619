"""The ``vllm`` command line: version, argument errors, and start-up
failures that must stop the server with a clear message."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.entrypoints.conftest import ENGINE_FLAGS, ROOT, THREADS_ENV, free_port
from vllm.entrypoints.cli.main import main
from vllm.entrypoints.cli.serve import parse_lora_module
from vllm.entrypoints.openai.serving_models import LoRAModulePath
from vllm.version import __version__


def run_main(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


def test_version(capsys):
    assert run_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == __version__


def test_lora_modules_forms():
    assert parse_lora_module("a=/x/y") == LoRAModulePath("a", "/x/y")
    item = json.dumps({"name": "b", "path": "/p", "base_model_name": "m"})
    assert parse_lora_module(item) == LoRAModulePath("b", "/p", "m")


@pytest.mark.parametrize("args, message", [
    (["--lora-modules", "a=/x"], "--lora-modules needs --enable-lora"),
    (["--enable-lora", "--lora-modules", "no-equals-sign"], "expected name=path"),
    (["--enable-lora", "--lora-modules", '{"name": "a"}'], '"path"'),
])
def test_argument_errors(capsys, model_path, args, message):
    assert run_main(["serve", model_path, *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_model(capsys):
    assert run_main(["serve"]) == 2
    assert "a model is required" in capsys.readouterr().err


def test_bad_chat_template(capsys, model_path):
    assert run_main(["serve", model_path, "--chat-template", "/no/such/template.jinja"]) == 1
    assert "--chat-template" in capsys.readouterr().err
    assert run_main(["serve", model_path, "--chat-template", "{% if %}"]) == 1
    assert "does not parse" in capsys.readouterr().err


def test_bad_adapter_stops_start_up(model_path, adapters, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                            "lora_alpha": 8}))
    proc = subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_path, *ENGINE_FLAGS,
         "--port", str(free_port()), "--host", "127.0.0.1",
         "--lora-modules", f"good={adapters['a0']}", f"broken={broken}"],
        cwd=ROOT, env={**os.environ, **THREADS_ENV}, capture_output=True, text=True,
        timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "cannot load LoRA adapter 'broken'" in proc.stderr
    assert "adapter_model.safetensors" in proc.stderr  # the reason
