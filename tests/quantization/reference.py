"""Independent references for quantized checkpoints (no vllm code).

- ``dequantized_tensors`` reads a quantized checkpoint written by
  ``vllm.tools.quantize`` (or any checkpoint in those formats) and returns
  the float checkpoint it stands for, in Hugging Face keys, decoding each
  format from its definition (bit shifts on the int32 words, the E2M1
  formula, ``2 ** (s - 127)``, ...);
- ``write_reference_checkpoint`` saves that as a plain float checkpoint,
  so transformers (and the merged-LoRA helper) can run it;
- ``fake_quant`` / ``patch_w8a8`` make such a float model see FP8-rounded
  activations in every quantized projection, as a W8A8 engine does, while
  the LoRA delta (merged weights minus base weights) reads unquantized
  activations.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0
PROJ = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|w1|w2|w3)$")


def e2m1(code: torch.Tensor) -> torch.Tensor:
    code = code.long()
    e = (code >> 1) & 3
    m = (code & 1).double()
    mag = torch.where(e == 0, 0.5 * m, torch.pow(2.0, (e - 1).double()) * (1 + 0.5 * m))
    return torch.where((code & 8) != 0, -mag, mag)


def fp4_values(packed: torch.Tensor) -> torch.Tensor:
    b = packed.to(torch.int64)
    lo, hi = b & 0xF, (b >> 4) & 0xF
    return e2m1(torch.stack([lo, hi], dim=-1).reshape(*b.shape[:-1], -1))


def int4_values(words: torch.Tensor, k: int) -> torch.Tensor:
    w = words.to(torch.int64) & 0xFFFFFFFF
    vals = torch.stack([(w >> (4 * i)) & 0xF for i in range(8)], dim=-1)
    return (vals.reshape(*w.shape[:-1], -1)[..., :k] - 8).double()


def _per_group(scale: torch.Tensor, group: int, k: int) -> torch.Tensor:
    return scale.double().repeat_interleave(group, dim=-1)[..., :k]


def fp8_weight(q: torch.Tensor, scale: torch.Tensor, block=None) -> torch.Tensor:
    w = q.to(torch.float64)
    s = scale.double()
    if block is not None:
        bn, bk = block
        full = torch.kron(s, torch.ones(bn, bk, dtype=torch.float64))
        return w * full[:w.shape[0], :w.shape[1]]
    if s.numel() == 1:
        return w * s.reshape(())
    return w * s.reshape(-1, 1)


def quant_config(qdir: str) -> tuple[str, dict]:
    cfg = json.load(open(os.path.join(qdir, "config.json")))
    if "quantization_config" in cfg:
        qc = cfg["quantization_config"]
        return qc["quant_method"], qc
    return "modelopt", json.load(open(os.path.join(qdir, "hf_quant_config.json")))["quantization"]


def dequantized_tensors(qdir: str) -> dict[str, torch.Tensor]:
    """The float32 checkpoint (HF keys) a quantized checkpoint stands for."""
    method, qc = quant_config(qdir)
    t = load_file(os.path.join(qdir, "model.safetensors"))
    out = {}
    for key, value in t.items():
        if key.endswith((".weight_scale", ".weight_scale_inv", ".input_scale", ".weight_shape",
                         ".weight_global_scale", ".weight_scale_2", "_scales")):
            continue
        if key.endswith("_blocks"):  # GPT-OSS MXFP4: [E, out, in/32, 16] -> [E, in, out]
            scales = t[key[:-len("_blocks")] + "_scales"]
            vals = fp4_values(value.reshape(*value.shape[:2], -1))
            w = vals * torch.pow(2.0, scales.double() - 127).repeat_interleave(32, dim=-1)
            out[key[:-len("_blocks")]] = w.transpose(1, 2).float().contiguous()
            continue
        if key.endswith(".weight_packed"):
            module = key[:-len(".weight_packed")]
            scale = t[module + ".weight_scale"]
            if value.dtype == torch.int32:                       # INT4
                k = int(t[module + ".weight_shape"][1])
                group = k // scale.shape[1]
                w = int4_values(value, k) * _per_group(scale, group, k)
            else:                                                # compressed-tensors NVFP4
                vals = fp4_values(value)
                w = vals * _per_group(scale.to(torch.float64), 16, vals.shape[1])
                w = w / t[module + ".weight_global_scale"].double().reshape(())
            out[module + ".weight"] = w.float()
            continue
        if key.endswith(".weight") and value.dtype == torch.uint8:  # ModelOpt NVFP4
            module = key[:-len(".weight")]
            vals = fp4_values(value)
            w = vals * _per_group(t[module + ".weight_scale"].to(torch.float64), 16, vals.shape[1])
            out[key] = (w * t[module + ".weight_scale_2"].double().reshape(())).float()
            continue
        if key.endswith(".weight") and value.dtype == torch.float8_e4m3fn:
            module = key[:-len(".weight")]
            if method == "fp8":
                w = fp8_weight(value, t[module + ".weight_scale_inv"], qc["weight_block_size"])
            else:
                weights = qc["config_groups"]["group_0"]["weights"]
                w = fp8_weight(value, t[module + ".weight_scale"],
                                weights.get("block_structure"))
            out[key] = w.float()
            continue
        out[key] = value
    return out


def input_scales(qdir: str) -> dict[str, float]:
    """Static FP8 activation scales by checkpoint module name."""
    t = load_file(os.path.join(qdir, "model.safetensors"))
    return {k[:-len(".input_scale")]: float(v) for k, v in t.items()
            if k.endswith(".input_scale")}


def write_reference_checkpoint(qdir: str, out: str) -> str:
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(qdir):
        if f not in ("model.safetensors", "config.json", "hf_quant_config.json"):
            shutil.copy(os.path.join(qdir, f), os.path.join(out, f))
    cfg = json.load(open(os.path.join(qdir, "config.json")))
    cfg.pop("quantization_config", None)
    save_file(dequantized_tensors(qdir), os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    return out


# -- W8A8 reference -------------------------------------------------------------------

def fake_quant(x: torch.Tensor, kind: str, group: int = 0, scale: float | None = None):
    """x rounded through FP8 E4M3: per token, per token group, or static."""
    xf = x.float()
    if kind == "static":
        s = torch.tensor(scale, dtype=torch.float32)
    elif kind == "token":
        s = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    elif kind == "group":
        shape = xf.shape
        g = xf.reshape(*shape[:-1], shape[-1] // group, group)
        s = g.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        q = (g / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s
        return q.reshape(shape).to(x.dtype)
    else:
        raise ValueError(kind)
    q = (xf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s
    return q.to(x.dtype)


def _linear_forward(module, base_weight, quant):
    def forward(x):
        delta = module.weight - base_weight
        y = F.linear(quant(x), base_weight, module.bias)
        return y + F.linear(x, delta) if delta.abs().max() > 0 else y
    return forward


def _experts_forward(module, base_gate_up, base_down, quant13, quant2):
    def forward(hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            tok, pos = torch.where(top_k_index == e)
            x = hidden_states[tok]
            gu = F.linear(quant13(x), base_gate_up[e]) + \
                F.linear(x, module.gate_up_proj[e] - base_gate_up[e])
            gate, up = gu.chunk(2, dim=-1)
            h = module.act_fn(gate) * up
            y = F.linear(quant2(h), base_down[e]) + F.linear(h, module.down_proj[e] - base_down[e])
            out.index_add_(0, tok, y * top_k_weights[tok, pos, None])
        return out
    return forward


def patch_w8a8(model, base, kind: str, group: int = 0, static: dict[str, float] | None = None,
               disk_moe: str = "mlp"):
    """Make ``model`` (weights: base + LoRA deltas) compute every quantized
    projection as ``fq(x) @ W_base.T + x @ (W - W_base).T``. ``base`` holds
    the weights without adapters. Static scales follow the engine: the max
    over the checkpoint modules fused into one GEMM input (q/k/v, gate/up,
    all experts' gate/up, all experts' down)."""
    static = static or {}

    def quant_for(names):
        if kind != "static":
            return lambda x: fake_quant(x, kind, group)
        s = max(static[n] for n in names)
        return lambda x: fake_quant(x, "static", scale=s)

    fused = {"q_proj": ("q_proj", "k_proj", "v_proj"), "k_proj": ("q_proj", "k_proj", "v_proj"),
             "v_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj"),
             "up_proj": ("gate_proj", "up_proj")}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and PROJ.search(name):
            owner, leaf = name.rsplit(".", 1)
            names = [f"{owner}.{p}" for p in fused.get(leaf, (leaf,))]
            module.forward = _linear_forward(module, base.get_submodule(name).weight,
                                             quant_for(names))
        elif name.endswith(".experts") and hasattr(module, "gate_up_proj"):
            b = base.get_submodule(name)
            disk = name.replace(".mlp.", f".{disk_moe}.")
            E = module.gate_up_proj.shape[0]
            gate_up = ("w1", "w3") if disk_moe == "block_sparse_moe" else ("gate_proj", "up_proj")
            down = "w2" if disk_moe == "block_sparse_moe" else "down_proj"
            module.forward = _experts_forward(
                module, b.gate_up_proj, b.down_proj,
                quant_for([f"{disk}.{e}.{p}" for e in range(E) for p in gate_up]),
                quant_for([f"{disk}.{e}.{down}" for e in range(E)]))
    return model
