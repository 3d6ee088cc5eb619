"""Adapters for tests, and the merged-weights reference.

Adapters are written by hand in each on-disk format (per-expert keys,
legacy 3D, shared-outer) or produced by PEFT itself (3D
``target_parameters``), always with random non-zero A and B. The reference
merges an adapter into a float32 Hugging Face model straight from the
files, following the format definitions in FORMATS.md; it shares no code
with vllm/lora/peft.py.
"""
from __future__ import annotations

import json
import math
import os
import re

import torch
from safetensors.torch import load_file, save_file

P = "base_model.model."


def _hf(path: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _moe_dims(cfg):
    E = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or \
        getattr(cfg, "n_routed_experts")
    I = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    return E, cfg.hidden_size, I


def _sparse_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def _moe_prefix(model) -> str:
    """The MoE block's module name on disk (Mixtral's checkpoints say
    block_sparse_moe; in memory transformers 5 calls every one `mlp`)."""
    return "block_sparse_moe" if model.config.model_type == "mixtral" else "mlp"


def write_config(out: str, r: int, alpha: float, target_modules: list[str],
                 target_parameters: list[str] | None = None, peft_version: str | None = "0.21.2",
                 **extra) -> None:
    os.makedirs(out, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": target_modules,
           "target_parameters": target_parameters, "use_rslora": False, "use_dora": False,
           "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False, "rank_pattern": {},
           "alpha_pattern": {}, "task_type": "CAUSAL_LM", **extra}
    if peft_version is not None:
        cfg["peft_version"] = peft_version
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)


def write_per_expert_adapter(model_path: str, out: str, *, rank: int = 8, alpha: float = 16,
                             attention: tuple[str, ...] = ("q_proj", "v_proj"),
                             experts: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj"),
                             shared: bool = False, dense: bool = False, seed: int = 0,
                             scale: float = 0.3, **config_extra) -> str:
    """The transformers-4-era format: one LoRA pair per expert and projection
    (Mixtral spells them w1/w3/w2)."""
    model = _hf(model_path)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    ranks = config_extra.get("rank_pattern", {})

    def add(module: str, d_in: int, d_out: int, name_for_rank: str):
        r = next((v for k, v in ranks.items() if re.match(rf"(.*\.)?({k})$", name_for_rank)), rank)
        tensors[f"{P}{module}.lora_A.weight"] = torch.randn(r, d_in, generator=g) * scale
        tensors[f"{P}{module}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * scale

    E, H, I = _moe_dims(model.config)
    mixtral = model.config.model_type == "mixtral"
    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"} if mixtral else {}
    for i, layer in enumerate(model.model.layers):
        for proj in attention:
            lin = getattr(layer.self_attn, proj)
            m = f"model.layers.{i}.self_attn.{proj}"
            add(m, lin.in_features, lin.out_features, m)
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            for e in range(E):
                for proj in experts:
                    d_in, d_out = (I, H) if proj == "down_proj" else (H, I)
                    m = f"model.layers.{i}.{_moe_prefix(model)}.experts.{e}.{names.get(proj, proj)}"
                    add(m, d_in, d_out, m)
            shared_name = next((n for n in ("shared_expert", "shared_experts")
                                if getattr(mlp, n, None) is not None), None)
            if shared and shared_name:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    lin = getattr(getattr(mlp, shared_name), proj)
                    m = f"model.layers.{i}.mlp.{shared_name}.{proj}"
                    add(m, lin.in_features, lin.out_features, m)
        elif dense:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                lin = getattr(mlp, proj)
                m = f"model.layers.{i}.mlp.{proj}"
                add(m, lin.in_features, lin.out_features, m)
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
    targets = list(attention) + [names.get(p, p) for p in experts]
    write_config(out, rank, alpha, targets, peft_version="0.13.2", **config_extra)
    return out


def write_peft_3d_adapter(model_path: str, out: str, *, rank: int = 4, alpha: float = 8,
                          params: tuple[str, ...] = ("gate_up_proj", "down_proj"),
                          attention: tuple[str, ...] = ("q_proj", "o_proj"), seed: int = 0,
                          scale: float = 0.3, router: bool = False,
                          modules: tuple[str, ...] = (), **lora_kwargs) -> str:
    """A `target_parameters` adapter made by PEFT itself, B redrawn non-zero.
    ``router`` also adapts the router weight; ``modules`` adds more
    target_modules (e.g. shared-expert projections)."""
    from peft import LoraConfig, get_peft_model
    model = _hf(model_path)
    # PEFT matches in-memory module names, where every MoE block is `mlp`
    targets = [f"mlp.experts.{p}" for p in params]
    if router:
        targets.append("mlp.router.weight" if model.config.model_type == "gpt_oss"
                       else "mlp.gate.weight")
    config = LoraConfig(r=rank, lora_alpha=alpha,
                        target_modules=list(attention) + list(modules) or None,
                        target_parameters=targets, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    peft_model.save_pretrained(out)
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    for p in params:  # PEFT only warns when a target matches nothing
        assert any(".experts." in k for k in saved), f"PEFT matched no expert parameter {p}"
    return out


def to_legacy_3d(src: str, out: str, model_path: str, peft_version: str | None = "0.18.1") -> str:
    """Rewrite a current 3D adapter in the orientation PEFT 0.17-0.19.0 used
    for [E, out, in] parameters: per expert, A' = B^T and B' = A^T. Models
    whose expert parameters are [E, in, out] (GPT-OSS) were stored the same
    way by both versions: only the version changes."""
    cfg = json.load(open(os.path.join(src, "adapter_config.json")))
    config = _hf(model_path).config
    E, _, _ = _moe_dims(config)
    tensors = load_file(os.path.join(src, "adapter_model.safetensors"))
    new = dict(tensors)
    for key in tensors if config.model_type != "gpt_oss" else []:
        if ".experts." in key and key.endswith("lora_A.weight"):
            a, b = tensors[key], tensors[key.replace("lora_A", "lora_B")]
            r = a.shape[0] // E
            a_e = a.view(E, r, -1)                          # [E, r, in]
            b_e = b.view(b.shape[0], r, E).permute(2, 0, 1)  # [E, out, r]
            new_a = b_e.transpose(1, 2).reshape(E * r, -1)              # rows e*r+j: [out]
            new_b = a_e.permute(2, 1, 0).reshape(a.shape[1], r * E)     # cols j*E+e: [in]
            new[key], new[key.replace("lora_A", "lora_B")] = new_a, new_b
    os.makedirs(out, exist_ok=True)
    save_file(new, os.path.join(out, "adapter_model.safetensors"))
    cfg.pop("peft_version", None)
    if peft_version:
        cfg["peft_version"] = peft_version
    json.dump(cfg, open(os.path.join(out, "adapter_config.json"), "w"))
    return out


def write_shared_outer_adapter(model_path: str, out: str, *, rank: int = 4, alpha: float = 8,
                               seed: int = 0, scale: float = 0.3) -> str:
    """3D keys where gate_up's A and down's B are shared by all experts
    (expert dimension 1), the other factor per expert."""
    model = _hf(model_path)
    E, H, I = _moe_dims(model.config)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in _sparse_layers(model):
        m = f"{P}model.layers.{i}.{_moe_prefix(model)}.experts"
        tensors[f"{m}.base_layer.lora_A.weight"] = torch.randn(rank, H, generator=g) * scale
        tensors[f"{m}.base_layer.lora_B.weight"] = torch.randn(2 * I, rank * E, generator=g) * scale
        tensors[f"{m}.lora_A.weight"] = torch.randn(rank * E, I, generator=g) * scale
        tensors[f"{m}.lora_B.weight"] = torch.randn(H, rank, generator=g) * scale
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
    write_config(out, rank, alpha, [], [f"{_moe_prefix(model)}.experts.gate_up_proj",
                                        f"{_moe_prefix(model)}.experts.down_proj"])
    return out


# -- the merged-weights reference ----------------------------------------------------

def _pattern(pattern: dict, name: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _scale(cfg: dict, name: str) -> float:
    r = _pattern(cfg.get("rank_pattern") or {}, name, cfg["r"])
    alpha = _pattern(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _factor(t: torch.Tensor, experts: int, rank: int, e: int, rows: bool) -> torch.Tensor:
    """Expert e's block of a 3D factor: A rows e*r..e*r+r, B columns j*E+e
    (an expert dimension of 1 means shared by all experts)."""
    e = e if experts > 1 else 0
    if rows:
        return t[e * rank:(e + 1) * rank]
    return t[:, [j * experts + e for j in range(rank)]]


@torch.no_grad()
def merged_hf_model(model_path: str, adapter_dir: str):
    """The HF model with the adapter's deltas added to its weights."""
    model = _hf(model_path)
    cfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    E, H, I = _moe_dims(model.config)
    version = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)\.(\d+)",
                                             cfg.get("peft_version") or "0.17.0").groups())
    params = {n.rsplit(".", 1)[-1] for n in (cfg.get("target_parameters") or [])}
    transposed = model.config.model_type == "gpt_oss"
    for key in tensors:
        if not key.endswith("lora_A.weight"):
            continue
        module = key[len(P):-len(".lora_A.weight")]
        a, b = tensors[key].float(), tensors[key.replace("lora_A", "lora_B")].float()
        m = re.match(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)$", module)
        experts_mod = re.match(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts(\.base_layer)?$",
                               module)
        if m:
            layer, e, proj = int(m.group(1)), int(m.group(2)), m.group(3)
            exp = model.model.layers[layer].mlp.experts
            delta = _scale(cfg, module) * b @ a
            if proj in ("gate_proj", "w1"):
                exp.gate_up_proj[e, :I] += delta
            elif proj in ("up_proj", "w3"):
                exp.gate_up_proj[e, I:] += delta
            else:
                exp.down_proj[e] += delta
        elif experts_mod:
            layer = int(experts_mod.group(1))
            exp = model.model.layers[layer].mlp.experts
            expert_params = params & {"gate_up_proj", "down_proj"}
            param = "gate_up_proj" if experts_mod.group(2) or expert_params == {"gate_up_proj"} \
                else "down_proj"
            base = re.sub(r"\.base_layer$", "", module)
            r = _pattern(cfg.get("rank_pattern") or {}, f"{base}.{param}", cfg["r"])
            s = _scale(cfg, f"{base}.{param}")
            weight = getattr(exp, param)
            for e in range(E):
                a_e = _factor(a, a.shape[0] // r, r, e, rows=True)
                b_e = _factor(b, b.shape[1] // r, r, e, rows=False)
                delta = b_e @ a_e
                # [E, in, out] parameters (GPT-OSS) always take the delta
                # transposed; [E, out, in] ones only in the legacy orientation
                if transposed or version < (0, 19, 1):
                    delta = delta.T
                weight[e] += s * delta
        else:
            lin = model.get_submodule(module)
            lin.weight += _scale(cfg, module) * b @ a
    return model


def peft_model(model_path: str, adapter_dir: str):
    from peft import PeftModel
    return PeftModel.from_pretrained(_hf(model_path), adapter_dir).eval()
