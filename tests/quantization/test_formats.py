"""The quantization tool writes the exact on-disk formats, and the engine
reads them back to the same weights.

For every scheme: (1) the independent decoder in reference.py recovers
weights close to the float originals (the tool quantizes sensibly);
(2) where a library can read the result, it reads the same values:
transformers for HF ``fp8`` and GPT-OSS ``mxfp4`` (both dequantize on the
CPU), compressed-tensors' own decompressors for its formats; (3) after
loading, every quantized layer of the engine dequantizes to exactly those
weights (experts through their quant payload, linears through their
method)."""
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.quantization.reference import dequantized_tensors, quant_config
from tests.utils import model_dir
from vllm.model_executor.build_context import ModelBuildContext
from vllm.model_executor.layers.attention.selector import get_attention_backend
from vllm.model_executor.layers.fused_moe.layer import FusedMoE
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.model_loader.loader import load_model
from vllm.model_executor.quantization import get_quantization_config
from vllm.model_executor.quantization.dequant import dequant_fp8
from vllm.tools.quantize import quantize_checkpoint

CASES = {
    "fp8-block": ("qwen3_moe", "fp8-block", dict(block=(32, 32))),
    "fp8-block-128": ("mixtral", "fp8-block", {}),
    "fp8-ct-channel": ("qwen3_moe", "fp8-ct", {}),
    "fp8-ct-tensor-static": ("mixtral", "fp8-ct", dict(fp8_weights="tensor", fp8_acts="static")),
    "fp8-ct-block": ("glm4_moe", "fp8-ct", dict(fp8_weights="block", block=(16, 32))),
    "int4-ct-g32": ("glm4_moe", "int4-ct", dict(group_size=32)),
    "nvfp4": ("qwen3_moe", "nvfp4", {}),
    "nvfp4-modelopt": ("mixtral", "nvfp4-modelopt", {}),
    "mxfp4": ("gpt_oss", "mxfp4", {}),
}
# worst relative error (max |w - w_q| / max |w| per tensor) of each value format
BOUND = {"fp8": 0.07, "int4": 0.1, "nvfp4": 0.25, "mxfp4": 0.34}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.getbasetemp()


def checkpoint(root, name):
    arch, scheme, kwargs = CASES[name]
    src = model_dir(str(root), arch)
    out = os.path.join(root, f"fmt-{name}")
    if not os.path.isfile(os.path.join(out, "config.json")):
        quantize_checkpoint(src, out, scheme, **kwargs)
    return src, out


def _value_format(name):
    return "fp8" if name.startswith("fp8") else name.split("-")[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_tool_output_decodes_close_to_the_float_weights(root, name):
    src, q = checkpoint(root, name)
    original = load_file(os.path.join(src, "model.safetensors"))
    deq = dequantized_tensors(q)
    assert set(deq) == set(original)
    quantized = 0
    for key, w in original.items():
        if torch.equal(deq[key], w):
            continue
        quantized += 1
        err = ((deq[key] - w).abs().max() / w.abs().max()).item()
        assert err < BOUND[_value_format(name)], f"{key}: {err}"
    assert quantized > 0


@pytest.mark.parametrize("name", ["fp8-block", "fp8-block-128", "mxfp4"])
def test_transformers_reads_the_same_weights(root, name):
    from transformers import AutoModelForCausalLM
    _, q = checkpoint(root, name)
    deq = dequantized_tensors(q)
    model = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32)
    state = model.state_dict()
    compared = 0
    for key, w in deq.items():
        if key in state:
            assert torch.allclose(state[key].float(), w, rtol=1e-6, atol=1e-7), key
            compared += 1
    # experts: transformers keeps them stacked (gate_up rows, [E, in, out] for GPT-OSS)
    for layer in model.model.layers:
        experts = layer.mlp.experts
        prefix = next(k for k, v in model.named_modules() if v is experts)
        if name == "mxfp4":
            assert torch.allclose(experts.gate_up_proj.float(), deq[f"{prefix}.gate_up_proj"])
            assert torch.allclose(experts.down_proj.float(), deq[f"{prefix}.down_proj"])
        else:
            disk = prefix.replace(".mlp.", ".block_sparse_moe.") \
                if model.config.model_type == "mixtral" else prefix
            names = ("w1", "w3", "w2") if model.config.model_type == "mixtral" else \
                ("gate_proj", "up_proj", "down_proj")
            for e in range(experts.gate_up_proj.shape[0]):
                ref = torch.cat([deq[f"{disk}.{e}.{names[0]}.weight"],
                                 deq[f"{disk}.{e}.{names[1]}.weight"]])
                assert torch.allclose(experts.gate_up_proj[e].float(), ref, rtol=1e-6, atol=1e-7)
                assert torch.allclose(experts.down_proj[e].float(),
                                      deq[f"{disk}.{e}.{names[2]}.weight"], rtol=1e-6, atol=1e-7)
        compared += 1
    assert compared > 0


@pytest.mark.parametrize("name", ["fp8-ct-channel", "fp8-ct-tensor-static", "fp8-ct-block",
                                  "int4-ct-g32", "nvfp4"])
def test_compressed_tensors_decompresses_the_same_weights(root, name):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    _, q = checkpoint(root, name)
    _, qc = quant_config(q)
    ct = QuantizationConfig.model_validate({k: v for k, v in qc.items()})
    scheme = ct.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(ct.format)
    tensors = load_file(os.path.join(q, "model.safetensors"))
    deq = dequantized_tensors(q)
    modules = {k.rsplit(".", 1)[0] for k in tensors
               if k.endswith((".weight_packed", ".weight_scale"))}
    assert modules
    for module in sorted(modules):
        local = {k[len(module) + 1:]: v for k, v in tensors.items()
                 if k.rsplit(".", 1)[0] == module}
        out = compressor.decompress(local, scheme)["weight"]
        # compressed-tensors decodes FP4 into bfloat16: agree to its precision
        rtol = 4e-3 if out.dtype == torch.bfloat16 else 1e-6
        assert torch.allclose(out.float(), deq[f"{module}.weight"], rtol=rtol, atol=1e-7), module


def _engine_model(path):
    from transformers import AutoConfig
    hf = AutoConfig.from_pretrained(path)
    arch = hf.architectures[0]
    ctx = ModelBuildContext(hf_config=hf, dtype=torch.float32, device="cpu",
                            attention_backend=get_attention_backend("auto", "cpu"),
                            max_model_len=64, quant_config=get_quantization_config(path, hf, arch))
    return load_model(path, arch, ctx, progress=False)


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_loads_the_same_weights(root, name):
    _, q = checkpoint(root, name)
    deq = dequantized_tensors(q)
    model = _engine_model(q)
    checked = 0
    for mod_name, m in model.named_modules():
        disk = mod_name  # the checkpoint's module name (architecture renames undone)
        for old, new in reversed(type(model).checkpoint_renames):
            if old.endswith(".") and new.endswith("."):
                disk = disk.replace(new, old)
        if isinstance(m, FusedMoE):
            w = m.quant_method.expert_weights(m)
            assert w.quant is not None, mod_name
            cls = type(model)
            shards = {v: k for k, v in cls.expert_shards.items()}
            for e in range(m.moe_config.num_experts):
                got13 = w.quant.dequant(w.w13, "w13", e)
                got2 = w.quant.dequant(w.w2, "w2", e)
                if name == "mxfp4":
                    ref13 = deq[f"{disk}.gate_up_proj"][e].T
                    ref2 = deq[f"{disk}.down_proj"][e].T
                else:
                    ref13 = torch.cat([deq[f"{disk}.{e}.{shards['w1']}.weight"],
                                       deq[f"{disk}.{e}.{shards['w3']}.weight"]])
                    ref2 = deq[f"{disk}.{e}.{shards['w2']}.weight"]
                assert torch.allclose(got13, ref13, rtol=1e-6, atol=1e-7), f"{mod_name} {e} w13"
                assert torch.allclose(got2, ref2, rtol=1e-6, atol=1e-7), f"{mod_name} {e} w2"
            checked += 1
        elif isinstance(m, LinearBase) and type(m.quant_method).__name__ != \
                "UnquantizedLinearMethod":
            method = m.quant_method
            if hasattr(method, "scheme") and hasattr(method.scheme, "block"):  # FP8
                s = method.scheme
                got = dequant_fp8(m.weight, m.weight_scale,
                                  (1, s.block[1]) if s.weight == "block" else None)
            else:
                got = m.weight.float()
            owner, leaf = disk.rsplit(".", 1)
            parts = type(model).packed_modules_mapping.get(leaf, [leaf])
            ref = torch.cat([deq[f"{owner}.{p}.weight"] for p in parts])
            assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7), mod_name
            checked += 1
    assert checked > 0
