"""Quantization configs: which modules are quantized (ignore lists in
checkpoint names, fused modules), and clear errors for what cannot run."""
import json
import os

import pytest
import torch

from tests.utils import model_dir
from vllm import LLM
from vllm.config import ConfigError
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, MoEActivation
from vllm.model_executor.layers.fused_moe.oracle import (MoEBackendError, fp8_backends,
                                                         select_experts_backend,
                                                         weight_only_backends)
from vllm.model_executor.quantization import QuantizationError
from vllm.model_executor.quantization.compressed_tensors import CompressedTensorsConfig
from vllm.model_executor.quantization.fp8 import Fp8Config, Fp8LinearMethod, Fp8MoEMethod
from vllm.model_executor.quantization.mxfp4 import Mxfp4Config
from vllm.tools.quantize import quantize_checkpoint


def ct(weights, acts=None, fmt="float-quantized", ignore=(), targets=("Linear",)):
    group = {"targets": list(targets), "weights": weights}
    if acts:
        group["input_activations"] = acts
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": list(ignore),
            "config_groups": {"group_0": group}}


FP8_CHANNEL = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
               "dynamic": False}
FP8_TOKEN = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
             "dynamic": True}


def test_ignore_lists_use_checkpoint_names():
    cfg = CompressedTensorsConfig("Qwen3MoeForCausalLM", ct(
        FP8_CHANNEL, FP8_TOKEN, ignore=["lm_head", "re:.*mlp\\.gate$", "re:.*self_attn.*"]))
    assert cfg.linear_method("model.layers.0.self_attn.qkv_proj") is None
    assert cfg.linear_method("model.layers.0.self_attn.o_proj") is None
    assert isinstance(cfg.moe_method("model.layers.0.mlp.experts"), Fp8MoEMethod)
    # Mixtral's experts are block_sparse_moe.experts.<e>.w1/w2/w3 on disk
    mix = CompressedTensorsConfig("MixtralForCausalLM", ct(
        FP8_CHANNEL, FP8_TOKEN, ignore=["re:.*block_sparse_moe\\.experts.*"]))
    assert mix.moe_method("model.layers.1.mlp.experts") is None
    assert isinstance(mix.linear_method("model.layers.1.self_attn.qkv_proj"), Fp8LinearMethod)
    # GLM renames shared_experts -> shared_expert in memory
    glm = Fp8Config("Glm4MoeForCausalLM", {"quant_method": "fp8", "weight_block_size": [128, 128],
                                           "modules_to_not_convert": ["mlp.shared_experts"]})
    assert glm.linear_method("model.layers.1.mlp.shared_expert.gate_up_proj") is None
    assert glm.linear_method("model.layers.0.mlp.gate_up_proj") is not None
    # GPT-OSS: only the experts are MXFP4
    oss = Mxfp4Config("GptOssForCausalLM", {"quant_method": "mxfp4",
                                            "modules_to_not_convert": ["model.layers.*.self_attn"]})
    assert oss.linear_method("model.layers.0.self_attn.qkv_proj") is None
    assert oss.moe_method("model.layers.0.mlp.experts") is not None


def test_half_quantized_fused_module_is_an_error():
    cfg = CompressedTensorsConfig("Qwen3MoeForCausalLM", ct(FP8_CHANNEL, FP8_TOKEN,
                                                            ignore=["q_proj"]))
    with pytest.raises(QuantizationError, match="qkv_proj fuses modules.*q_proj"):
        cfg.linear_method("model.layers.0.self_attn.qkv_proj")


@pytest.mark.parametrize("weights,acts,fmt,words", [
    ({"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
     {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True},
     "int-quantized", ["int8", "channel", "not supported"]),
    ({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": False},
     None, "pack-quantized", ["int4", "asymmetric"]),
    ({"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
     {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
      "symmetric": True, "dynamic": "local"}, "float-quantized", ["float4", "tensor_group"]),
])
def test_unsupported_schemes_name_the_scheme(weights, acts, fmt, words):
    cfg = CompressedTensorsConfig("Qwen3MoeForCausalLM", ct(weights, acts, fmt))
    with pytest.raises(QuantizationError) as e:
        cfg.moe_method("model.layers.0.mlp.experts")
    for w in words:
        assert w in str(e.value)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.getbasetemp()


def _with_quant_config(src, out, qc):
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(src):
        if os.path.isfile(os.path.join(src, f)):
            data = open(os.path.join(src, f), "rb").read()
            open(os.path.join(out, f), "wb").write(data)
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg["quantization_config"] = qc
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    return out


def test_engine_errors(root):
    src = model_dir(str(root), "qwen3_moe")
    awq = _with_quant_config(src, os.path.join(root, "awq"), {"quant_method": "awq", "bits": 4})
    with pytest.raises(ConfigError, match="'awq' is not supported"):
        LLM(awq)
    with pytest.raises(ConfigError, match="not quantized"):
        LLM(src, quantization="fp8")
    fp8 = os.path.join(root, "q-fp8")
    quantize_checkpoint(src, fp8, "fp8-ct")
    with pytest.raises(ConfigError, match="does not match"):
        LLM(fp8, quantization="mxfp4")
    # a checkpoint whose tensors do not fit its declared scheme
    wrong = _with_quant_config(src, os.path.join(root, "wrong"),
                               json.load(open(os.path.join(fp8, "config.json")))
                               ["quantization_config"])
    with pytest.raises(Exception, match="weight_scale|missing"):
        LLM(wrong)


def _moe(scheme, device="cpu", group=0):
    return FusedMoEConfig(num_experts=4, num_local_experts=4, top_k=2, hidden_size=64,
                          intermediate_size=32, activation=MoEActivation(), has_bias=False,
                          dtype=torch.float32, device=device, quant_scheme=scheme,
                          quant_group_size=group)


def test_backend_oracle_per_scheme():
    assert select_experts_backend(_moe("fp8"), fp8_backends(), "auto", True).__name__ == \
        "TorchFp8Experts"
    assert select_experts_backend(_moe("nvfp4"), weight_only_backends(), "auto", True).__name__ \
        == "TorchWeightOnlyExperts"
    with pytest.raises(MoEBackendError, match="unknown --moe-backend 'grouped_mm' for fp8"):
        select_experts_backend(_moe("fp8"), fp8_backends(), "grouped_mm", True)
    with pytest.raises(MoEBackendError, match="triton cannot run fp8 experts here"):
        select_experts_backend(_moe("fp8"), fp8_backends(), "triton", True)
    # a quantized backend without LoRA asked for explicitly: the error lists
    # those that can; auto never picks it with LoRA on
    class NoLoRAFp8(fp8_backends()[1]):
        name = "fast_no_lora"
        priority = 100

        @classmethod
        def supports_lora(cls):
            return False

    candidates = (NoLoRAFp8,) + fp8_backends()
    with pytest.raises(MoEBackendError, match="cannot run LoRA.*one of: torch"):
        select_experts_backend(_moe("fp8"), candidates, "fast_no_lora", True)
    assert select_experts_backend(_moe("fp8"), candidates, "auto", True).name == "torch"
    assert select_experts_backend(_moe("fp8"), candidates, "auto", False) is NoLoRAFp8
    # the Triton weight-only kernel tiles K by whole groups: other group sizes
    # go to the torch experts
    from vllm.model_executor.layers.fused_moe.experts.triton_weight_only import (
        TritonWeightOnlyExperts)
    assert "power-of-two" in TritonWeightOnlyExperts.unsupported_reason(_moe("int4", "cuda", 24))
    assert TritonWeightOnlyExperts.unsupported_reason(_moe("int4", "cuda", 128)) in (
        None, "triton is not installed")
    # every quantized experts class can run LoRA
    for cls in fp8_backends() + weight_only_backends():
        assert cls.supports_lora()
