"""Bad input gets a clear error, and the engine keeps working afterwards."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.utils import PROMPTS, model_dir
from vllm import LLM, SamplingParams
from vllm.config import ConfigError
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.llm_engine import InvalidRequestError


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return model_dir(str(tmp_path_factory.getbasetemp()), "mixtral")


@pytest.fixture(scope="module")
def llm(path):
    return LLM(path, dtype="float32", max_model_len=64)


def broken_copy(path, tmp_path, edit):
    dst = tmp_path / "broken"
    shutil.copytree(path, dst)
    edit(dst)
    return str(dst)


def test_unsupported_architecture(path, tmp_path):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["architectures"] = ["LlamaForCausalLM"]
        (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*not supported"):
        LLM(broken_copy(path, tmp_path, edit), dtype="float32")


def test_missing_weight_file(path, tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        LLM(broken_copy(path, tmp_path, lambda d: (d / "model.safetensors").unlink()),
            dtype="float32")


def test_missing_tensor_is_named(path, tmp_path):
    def edit(d):
        weights = load_file(d / "model.safetensors")
        del weights["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
        save_file(weights, d / "model.safetensors")
    with pytest.raises(ValueError, match="layers.1.mlp.experts.w13_weight \\(expert 3 w3\\)"):
        LLM(broken_copy(path, tmp_path, edit), dtype="float32")


def test_misshaped_tensor_is_named(path, tmp_path):
    def edit(d):
        weights = load_file(d / "model.safetensors")
        weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
        save_file(weights, d / "model.safetensors")
    with pytest.raises(ValueError, match="self_attn.k_proj.weight.*shape \\(8, 64\\)"):
        LLM(broken_copy(path, tmp_path, edit), dtype="float32")


def test_unexpected_tensor_is_named(path, tmp_path):
    def edit(d):
        weights = load_file(d / "model.safetensors")
        weights["model.layers.0.mystery.weight"] = torch.zeros(2)
        save_file(weights, d / "model.safetensors")
    with pytest.raises(ValueError, match="mystery"):
        LLM(broken_copy(path, tmp_path, edit), dtype="float32")


def test_missing_model_directory():
    with pytest.raises(ConfigError, match="not a directory"):
        LLM("/nonexistent/model", dtype="float32")


@pytest.mark.parametrize("kwargs,message", [
    ({"dtype": "int8"}, "dtype"), ({"device": "tpu"}, "device"), ({"block_size": 3}, "block-size"),
    ({"max_model_len": 100000}, "max-model-len"), ({"gpu_memory_utilization": 1.5}, "utilization"),
    ({"max_num_seqs": 0}, "max-num-seqs"), ({"moe_backend": "magic"}, "moe-backend"),
    ({"attention_backend": "flash"}, "attention-backend"),
])
def test_invalid_engine_args(path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(path, **{"dtype": "float32", **kwargs})


def test_bad_requests_leave_engine_usable(llm):
    tok = llm.get_tokenizer()
    good = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    before = llm.generate(PROMPTS[0], good, use_tqdm=False)[0].outputs[0].token_ids
    too_long = tok.encode(" ".join(["hello"] * 80))
    with pytest.raises(InvalidRequestError, match="context length"):
        llm.generate([PROMPTS[1], {"prompt_token_ids": too_long}], good, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate({"prompt_token_ids": []}, good, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [1, 10**6]}, good, use_tqdm=False)
    with pytest.raises(ValueError, match="2 entries for 3 prompts"):
        llm.generate(PROMPTS[:3], [good, good], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate(PROMPTS[0], good, use_tqdm=False)[0].outputs[0].token_ids == before


def test_request_too_big_for_the_cache_is_refused_at_submit(path):
    llm = LLM(path, dtype="float32", max_model_len=64, block_size=4, num_gpu_blocks_override=3)
    with pytest.raises(InvalidRequestError, match="KV-cache blocks"):
        llm.generate(PROMPTS[3], SamplingParams(max_tokens=32), use_tqdm=False)


def test_engine_args_from_cli():
    import argparse
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    parser.add_argument("model")
    args = EngineArgs.from_cli_args(parser.parse_args(
        ["m", "--max-model-len", "128", "--enable-lora", "--max-loras", "4", "-tp", "2"]))
    assert (args.model, args.max_model_len, args.enable_lora, args.max_loras,
            args.tensor_parallel_size) == ("m", 128, True, 4, 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--dtype", "int3"])


def test_stop_token_and_logprob_limits_are_checked_at_submit(llm):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate("x", SamplingParams(stop_token_ids=[10**7]), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="max-logprobs"):
        llm.generate("x", SamplingParams(logprobs=21), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="max-logprobs"):
        llm.generate("x", SamplingParams(prompt_logprobs=100), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
