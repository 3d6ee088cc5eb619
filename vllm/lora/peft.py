"""Read and validate PEFT LoRA adapters into canonical tensors.

Every supported on-disk format becomes the same canonical form, with the
scaling folded into B:

- linear targets (attention q/k/v/o, dense MLP, shared experts, small
  gates): ``A [r, in]``, ``B [out, r]`` so that ``W' = W + B @ A``;
- routed experts: per expert ``A [E, r, in]``, ``B [E, out, r]`` for each of
  gate (w1), up (w3) and down (w2), or one fused gate_up factor pair
  (``B [E, 2I, r]``, rows in the model's gate/up layout).

Formats (see FORMATS.md): per-expert keys (``experts.e.gate_proj`` /
``w1``...), fused 3D ``target_parameters`` keys (``experts.base_layer.lora_*``
for gate_up, ``experts.lora_*`` for down; row ``e*r + j`` of A, column
``j*E + e`` of B), the legacy 3D orientation written by PEFT 0.17-0.19.0,
and shared-outer layouts (an expert dimension of 1 on one factor).

Reading is all-or-nothing: any problem raises ``LoRAError`` naming it, and
nothing is returned half-built.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

PREFIX = "base_model.model."


class LoRAError(ValueError):
    """An adapter that cannot be served, with the reason."""


@dataclass(frozen=True)
class LinearTarget:
    """A linear layer an adapter may target: ``module`` (our module name)
    and ``slice`` (position within a fused projection) with its full,
    unsharded shape."""
    module: str
    slice: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class MoETarget:
    """A routed-experts layer. ``out_in_layout`` is True when the model's
    stacked expert parameters are stored ``[E, out, in]`` (transformers'
    layout for most MoE models), False for ``[E, in, out]`` (GPT-OSS); it
    decides how legacy 3D adapters are oriented."""
    module: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    out_in_layout: bool = True


@dataclass
class LoRALinearWeights:
    """One factor pair: A [r, in], B [out, r] (scaled), or stacked per expert
    with a leading expert dimension."""
    lora_a: torch.Tensor
    lora_b: torch.Tensor

    @property
    def rank(self) -> int:
        return self.lora_a.shape[-2]


@dataclass
class MoELoRAWeights:
    """Routed-expert factors of one MoE layer; unset projections are not
    targeted. ``gate_up`` (fused) excludes ``gate``/``up``."""
    gate: LoRALinearWeights | None = None     # A [E, r, H], B [E, I, r]
    up: LoRALinearWeights | None = None
    gate_up: LoRALinearWeights | None = None  # A [E, r, H], B [E, 2I, r]
    down: LoRALinearWeights | None = None     # A [E, r, I], B [E, H, r]

    def parts(self) -> list[LoRALinearWeights]:
        return [p for p in (self.gate, self.up, self.gate_up, self.down) if p is not None]


@dataclass
class LoRAAdapter:
    name: str
    int_id: int
    path: str
    linear: dict[tuple[str, int], LoRALinearWeights] = field(default_factory=dict)
    moe: dict[str, MoELoRAWeights] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        ranks = [w.rank for w in self.linear.values()]
        ranks += [p.rank for m in self.moe.values() for p in m.parts()]
        return max(ranks, default=0)


@dataclass
class AdapterConfig:
    r: int
    alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_parameters: list[str]
    legacy_3d: bool

    def _pattern_value(self, pattern: dict, name: str, default):
        # PEFT's rule: the first pattern key matching the end of the name
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        return default

    def rank_for(self, name: str) -> int:
        return int(self._pattern_value(self.rank_pattern, name, self.r))

    def scale_for(self, name: str) -> float:
        r = self.rank_for(name)
        alpha = float(self._pattern_value(self.alpha_pattern, name, self.alpha))
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _parse_version(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", text.split("@")[0])
    return tuple(int(x) for x in m.groups()) if m else None


def read_adapter_config(path: str) -> AdapterConfig:
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isdir(path):
        raise LoRAError(f"adapter path {path!r} is not a directory")
    if not os.path.isfile(cfg_path):
        raise LoRAError(f"adapter {path!r} has no adapter_config.json")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LoRAError(f"cannot read {cfg_path}: {e}") from None
    if raw.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"adapter {path!r} is a {raw.get('peft_type')} adapter, not LoRA")
    if raw.get("use_dora"):
        raise LoRAError(f"adapter {path!r} uses DoRA, which is not supported")
    if raw.get("bias", "none") not in ("none", None) or raw.get("lora_bias"):
        raise LoRAError(f"adapter {path!r} trains LoRA bias terms, which are not supported")
    if raw.get("fan_in_fan_out"):
        raise LoRAError(f"adapter {path!r} uses fan_in_fan_out, which is not supported")
    if raw.get("modules_to_save"):
        raise LoRAError(f"adapter {path!r} saves full copies of modules "
                        f"({raw['modules_to_save']}), which is not supported")
    if "r" not in raw or "lora_alpha" not in raw:
        raise LoRAError(f"{cfg_path} lacks `r` or `lora_alpha`")
    targets = raw.get("target_parameters") or []
    version = _parse_version(raw.get("peft_version"))
    # PEFT 0.17.x wrote no peft_version; the orientation fix landed in 0.19.1
    legacy = bool(targets) and (version is None or version < (0, 19, 1))
    return AdapterConfig(int(raw["r"]), float(raw["lora_alpha"]), bool(raw.get("use_rslora")),
                         dict(raw.get("rank_pattern") or {}), dict(raw.get("alpha_pattern") or {}),
                         list(targets), legacy)


def read_adapter_tensors(path: str) -> dict[str, torch.Tensor]:
    st = os.path.join(path, "adapter_model.safetensors")
    binary = os.path.join(path, "adapter_model.bin")
    try:
        if os.path.isfile(st):
            from safetensors.torch import load_file
            return load_file(st)
        if os.path.isfile(binary):
            return torch.load(binary, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise many types
        raise LoRAError(f"cannot read the weights of adapter {path!r}: {e}") from None
    raise LoRAError(f"adapter {path!r} has no adapter_model.safetensors or adapter_model.bin")


_FACTOR = re.compile(r"^(.*)\.lora_(A|B)(?:\.[A-Za-z0-9_]+)?\.weight$")
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)$")


def _split_key(key: str) -> tuple[str, str]:
    """'base_model.model.X.lora_A.weight' -> ('X', 'A')."""
    if key.startswith(PREFIX):
        key = key[len(PREFIX):]
    if "lora_magnitude_vector" in key:
        raise LoRAError("the adapter has DoRA magnitude vectors; DoRA is not supported")
    if "lora_embedding_" in key:
        raise LoRAError(f"the adapter targets an embedding ({key}); only linear layers and "
                        "experts are supported")
    if re.search(r"\.lora_B(\.[A-Za-z0-9_]+)?\.bias$", key):
        raise LoRAError(f"the adapter has LoRA bias terms ({key}), which are not supported")
    m = _FACTOR.match(key)
    if m is None:
        raise LoRAError(f"unexpected tensor {key!r} in the adapter")
    return m.group(1), m.group(2)


def read_peft_adapter(name: str, int_id: int, path: str, *,
                      linear_targets: dict[str, LinearTarget],
                      moe_targets: dict[str, MoETarget],
                      expert_shards: dict[str, str],
                      rename: Callable[[str], str],
                      max_rank: int) -> LoRAAdapter:
    """Read the adapter at ``path`` for a model described by its targets.

    ``linear_targets`` maps our (renamed, unpacked) module names such as
    ``model.layers.0.self_attn.q_proj`` to their target; ``moe_targets`` maps
    expert modules (``...mlp.experts``); ``expert_shards`` maps per-expert
    projection names on disk to w1/w3/w2; ``rename`` applies the model's
    checkpoint renames to module names.
    """
    cfg = read_adapter_config(path)
    tensors = read_adapter_tensors(path)
    if not tensors:
        raise LoRAError(f"adapter {path!r} contains no tensors")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, which = _split_key(key)
        factors.setdefault(module, {})[which] = tensor
    adapter = LoRAAdapter(name, int_id, path)
    per_expert: dict[str, dict[str, dict[int, LoRALinearWeights]]] = {}
    for peft_module, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"module {peft_module!r} has lora_{next(iter(ab))} but not its pair")
        a, b = ab["A"].float(), ab["B"].float()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise LoRAError(f"module {peft_module!r} has non-finite (NaN or inf) LoRA weights")
        if a.dim() != 2 or b.dim() != 2:
            raise LoRAError(f"module {peft_module!r}: LoRA factors must be 2-D, got "
                            f"{tuple(a.shape)} and {tuple(b.shape)}")
        # renames are written for parameter keys ("...mlp.router.weight")
        module = rename(peft_module + ".")[:-1]
        stripped = re.sub(r"(\.base_layer)+$", "", module)
        if stripped in moe_targets:
            _read_fused_experts(adapter, cfg, peft_module, module, a, b, moe_targets[stripped])
            continue
        m = _EXPERT.match(module)
        if m and m.group(1) in moe_targets and m.group(3) in expert_shards:
            rank = cfg.rank_for(peft_module)
            _check_rank(peft_module, a, b, rank)
            per_expert.setdefault(m.group(1), {}).setdefault(
                expert_shards[m.group(3)], {})[int(m.group(2))] = LoRALinearWeights(
                    a, b * cfg.scale_for(peft_module))
            continue
        target = linear_targets.get(module)
        if target is None:
            raise LoRAError(f"the adapter targets {peft_module!r}, which is not a supported "
                            "LoRA target of this model")
        _check_rank(peft_module, a, b, cfg.rank_for(peft_module))
        if a.shape[1] != target.in_features or b.shape[0] != target.out_features:
            raise LoRAError(f"module {peft_module!r}: LoRA shapes A {tuple(a.shape)}, B "
                            f"{tuple(b.shape)} do not fit the base layer ({target.out_features} x "
                            f"{target.in_features})")
        adapter.linear[(target.module, target.slice)] = LoRALinearWeights(
            a, b * cfg.scale_for(peft_module))
    for module, shards in per_expert.items():
        _stack_experts(adapter, module, shards, moe_targets[module])
    if adapter.rank > max_rank:
        raise LoRAError(f"adapter rank {adapter.rank} is above --max-lora-rank {max_rank}")
    return adapter


def _check_rank(module: str, a: torch.Tensor, b: torch.Tensor, rank: int) -> None:
    if a.shape[0] != b.shape[1]:
        raise LoRAError(f"module {module!r}: lora_A has {a.shape[0]} rows but lora_B has "
                        f"{b.shape[1]} columns")
    if a.shape[0] != rank:
        raise LoRAError(f"module {module!r}: LoRA rank {a.shape[0]} does not match the rank "
                        f"{rank} declared in adapter_config.json")


def _stack_experts(adapter: LoRAAdapter, module: str,
                   shards: dict[str, dict[int, LoRALinearWeights]], target: MoETarget) -> None:
    E, H, I = target.num_experts, target.hidden_size, target.intermediate_size
    out = adapter.moe.setdefault(module, MoELoRAWeights())
    for shard, experts in shards.items():
        bad = [e for e in experts if not 0 <= e < E]
        if bad:
            raise LoRAError(f"{module}: expert {bad[0]} does not exist (the model has {E})")
        d_in, d_out = (I, H) if shard == "w2" else (H, I)
        rank = max(w.rank for w in experts.values())
        a = torch.zeros(E, rank, d_in)
        b = torch.zeros(E, d_out, rank)
        for e, w in experts.items():
            if w.lora_a.shape[1] != d_in or w.lora_b.shape[0] != d_out:
                raise LoRAError(f"{module}.{e} ({shard}): LoRA shapes A {tuple(w.lora_a.shape)}, "
                                f"B {tuple(w.lora_b.shape)} do not fit the expert "
                                f"({d_out} x {d_in})")
            a[e, :w.rank] = w.lora_a
            b[e, :, :w.rank] = w.lora_b
        setattr(out, {"w1": "gate", "w3": "up", "w2": "down"}[shard], LoRALinearWeights(a, b))


def _fused_param(cfg: AdapterConfig, module: str) -> str:
    """Which stacked expert parameter a 3D key belongs to. PEFT nests one
    wrapper per targeted parameter and gate_up is innermost, so
    ``experts.base_layer`` is gate_up; a lone ``experts`` is whichever single
    parameter ``target_parameters`` names (or down when both are named)."""
    names = {t.rsplit(".", 1)[-1] for t in cfg.target_parameters} & {"gate_up_proj", "down_proj"}
    if module.endswith(".base_layer"):
        return "gate_up_proj"
    if names == {"gate_up_proj"}:
        return "gate_up_proj"
    if "down_proj" in names:
        return "down_proj"
    raise LoRAError(f"cannot tell which expert parameter {module!r} adapts "
                    f"(target_parameters: {cfg.target_parameters})")


def _read_fused_experts(adapter: LoRAAdapter, cfg: AdapterConfig, peft_module: str, module: str,
                        a: torch.Tensor, b: torch.Tensor, target: MoETarget) -> None:
    param = _fused_param(cfg, module)
    E, H, I = target.num_experts, target.hidden_size, target.intermediate_size
    base = re.sub(r"(\.base_layer)+$", "", peft_module)
    rank = cfg.rank_for(f"{base}.{param}")
    # canonical orientation: delta_e [out, in] = B_e @ A_e
    d_out, d_in = (2 * I, H) if param == "gate_up_proj" else (H, I)
    if cfg.legacy_3d and target.out_in_layout:
        # PEFT < 0.19.1 took parameters as [E, in, out]: its A carries the
        # output dim and its B the input dim, each the other's transpose.
        a_rows, b_rows = a.shape[1], b.shape[0]
        if a_rows != d_out or b_rows != d_in:
            raise LoRAError(f"{peft_module} ({param}, legacy 3D layout): LoRA shapes A "
                            f"{tuple(a.shape)}, B {tuple(b.shape)} do not fit the experts")
        a_exp, b_exp = _expert_dims(peft_module, a.shape[0], b.shape[1], rank, E)
        a_e = _expert_rows(a, a_exp, rank)            # [E, r, d_out]
        b_e = _expert_cols(b, b_exp, rank)            # [E, d_in, r]
        new_a, new_b = b_e.transpose(1, 2), a_e.transpose(1, 2)
    else:
        if a.shape[1] != d_in or b.shape[0] != d_out:
            raise LoRAError(f"{peft_module} ({param}): LoRA shapes A {tuple(a.shape)}, B "
                            f"{tuple(b.shape)} do not fit the experts ({d_out} x {d_in} each)")
        a_exp, b_exp = _expert_dims(peft_module, a.shape[0], b.shape[1], rank, E)
        new_a, new_b = _expert_rows(a, a_exp, rank), _expert_cols(b, b_exp, rank)
    new_a = new_a.expand(E, -1, -1).contiguous()
    new_b = new_b.expand(E, -1, -1).contiguous() * cfg.scale_for(f"{base}.{param}")
    weights = adapter.moe.setdefault(module.split(".base_layer")[0], MoELoRAWeights())
    setattr(weights, "gate_up" if param == "gate_up_proj" else "down",
            LoRALinearWeights(new_a, new_b))


def _expert_dims(module: str, a_rows: int, b_cols: int, rank: int, E: int) -> tuple[int, int]:
    """Expert count of each factor: E, or 1 for a factor shared by all
    experts (shared-outer layouts)."""
    dims = []
    for n in (a_rows, b_cols):
        if n == rank * E:
            dims.append(E)
        elif n == rank:
            dims.append(1)
        else:
            raise LoRAError(f"{module}: a factor with {n} rank rows fits neither rank {rank} x "
                            f"{E} experts nor one shared factor")
    return dims[0], dims[1]


def _expert_rows(a: torch.Tensor, experts: int, rank: int) -> torch.Tensor:
    """A: row e*r + j -> [experts, r, in]."""
    return a.view(experts, rank, a.shape[1])


def _expert_cols(b: torch.Tensor, experts: int, rank: int) -> torch.Tensor:
    """B: column j*E + e -> [experts, out, r]."""
    return b.view(b.shape[0], rank, experts).permute(2, 0, 1)
