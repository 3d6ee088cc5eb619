"""The decoder-only MoE transformer shared by every supported architecture.

Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GLM-4.5 and GPT-OSS differ in a
handful of declared choices (biases, q/k norms, router scoring, shared
experts, sliding windows, sinks, weight names), not in structure. Each
architecture's module turns its Hugging Face config into a ``DecoderSpec``
and names its checkpoint conventions; this module builds and loads the
network. Module names follow the Hugging Face ones, so checkpoint and
adapter keys map onto modules with a short rename table.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vllm.model_executor.build_context import ModelBuildContext
from vllm.model_executor.layers.activation import gated_activation
from vllm.model_executor.layers.attention.backend import AttentionMetadata
from vllm.model_executor.layers.attention.layer import Attention
from vllm.model_executor.layers.fused_moe.config import MoEActivation
from vllm.model_executor.layers.fused_moe.layer import FusedMoE
from vllm.model_executor.layers.fused_moe.router import RouterConfig
from vllm.model_executor.layers.layernorm import RMSNorm, ShardedRMSNorm
from vllm.model_executor.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                               ReplicatedLinear, RowParallelLinear,
                                               WeightShapeError)
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from vllm.model_executor.layers.vocab_parallel_embedding import (ParallelLMHead,
                                                                 VocabParallelEmbedding)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, extra or mis-shaped tensors."""


@dataclass
class AttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    rope: dict[str, Any]
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None      # None, "head" (per head) or "full" (whole projection)
    clip_qkv: float | None = None
    has_sinks: bool = False


@dataclass
class MoESpec:
    num_experts: int
    top_k: int
    intermediate_size: int
    router: RouterConfig
    activation: MoEActivation = field(default_factory=MoEActivation)
    expert_bias: bool = False
    router_bias: bool = False
    router_fp32: bool = False            # router logits computed in float32 (GLM-4.5)
    correction_bias: bool = False
    shared_intermediate_size: int = 0
    shared_gate: bool = False


@dataclass
class LayerSpec:
    moe: MoESpec | None = None           # None: a dense gated MLP
    dense_intermediate_size: int = 0
    sliding_window: int | None = None


@dataclass
class DecoderSpec:
    vocab_size: int
    hidden_size: int
    rms_norm_eps: float
    hidden_act: str
    attention: AttentionSpec
    layers: list[LayerSpec]
    tie_word_embeddings: bool = False


class SelfAttention(nn.Module):
    def __init__(self, spec: AttentionSpec, hidden_size: int, eps: float,
                 sliding_window: int | None, ctx: ModelBuildContext, prefix: str):
        super().__init__()
        tp, dtype = ctx.parallel.tp, ctx.dtype
        self.qkv_proj = QKVParallelLinear(hidden_size, spec.head_dim, spec.num_heads,
                                          spec.num_kv_heads, spec.qkv_bias, dtype, tp,
                                          ctx.linear_method(f"{prefix}.qkv_proj"))
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = spec.head_dim
        self.q_size = self.num_heads * spec.head_dim
        self.kv_size = self.num_kv_heads * spec.head_dim
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, hidden_size, spec.o_bias,
                                        dtype, tp, ctx.linear_method(f"{prefix}.o_proj"))
        self.qk_norm = spec.qk_norm
        if spec.qk_norm == "head":
            self.q_norm = RMSNorm(spec.head_dim, eps, dtype)
            self.k_norm = RMSNorm(spec.head_dim, eps, dtype)
        elif spec.qk_norm == "full":
            if self.qkv_proj.kv_replicas > 1:
                raise ValueError("q/k norms over the whole projection need at least as many KV "
                                 "heads as tensor-parallel ranks")
            self.q_norm = ShardedRMSNorm(spec.num_heads * spec.head_dim, eps, dtype, tp)
            self.k_norm = ShardedRMSNorm(spec.num_kv_heads * spec.head_dim, eps, dtype, tp)
        self.clip_qkv = spec.clip_qkv
        self.rotary_emb = RotaryEmbedding(spec.head_dim, spec.rotary_dim, ctx.max_model_len,
                                          spec.rope)
        if spec.has_sinks:
            self.sinks = nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32),
                                      requires_grad=False)
            self.sinks.weight_loader = self._load_sinks
        else:
            self.sinks = None
        self.attn = Attention(self.num_heads, spec.head_dim, spec.head_dim ** -0.5,
                              self.num_kv_heads, ctx.attention_backend, sliding_window)

    def _load_sinks(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        tp = self.o_proj.tp
        if loaded.shape != (self.num_heads * tp.world_size,):
            raise WeightShapeError(f"shape {tuple(loaded.shape)} does not match the expected "
                                   f"({self.num_heads * tp.world_size},)")
        param.data.copy_(loaded.narrow(0, tp.rank * self.num_heads, self.num_heads))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "head":
            T = q.shape[0]
            q = self.q_norm(q.reshape(T, -1, self.head_dim)).reshape(T, -1)
            k = self.k_norm(k.reshape(T, -1, self.head_dim)).reshape(T, -1)
        elif self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, meta, self.sinks)
        return self.o_proj(out)


class GatedMLP(nn.Module):
    """act(gate) * up -> down; the dense MLP and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str,
                 ctx: ModelBuildContext, prefix: str):
        super().__init__()
        tp, dtype = ctx.parallel.tp, ctx.dtype
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, False, dtype, tp,
            ctx.linear_method(f"{prefix}.gate_up_proj"))
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, dtype, tp,
                                           ctx.linear_method(f"{prefix}.down_proj"))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated_activation(self.gate_up_proj(x), self.act))


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ an optional, optionally gated, shared expert)."""

    def __init__(self, spec: MoESpec, hidden_size: int, act: str, ctx: ModelBuildContext,
                 prefix: str):
        super().__init__()
        self.router_fp32 = spec.router_fp32
        self.gate = ReplicatedLinear(hidden_size, spec.num_experts, spec.router_bias,
                                     torch.float32 if spec.router_fp32 else ctx.dtype)
        self.experts = FusedMoE(
            spec.num_experts, spec.top_k, hidden_size, spec.intermediate_size,
            params_dtype=ctx.dtype, router=spec.router, parallel=ctx.parallel,
            activation=spec.activation, has_bias=spec.expert_bias,
            has_correction_bias=spec.correction_bias, moe_backend=ctx.moe_backend,
            lora_enabled=ctx.lora_enabled, device=ctx.device,
            quant_method=ctx.moe_method(f"{prefix}.experts"))
        if spec.shared_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, spec.shared_intermediate_size, act, ctx,
                                          f"{prefix}.shared_expert")
            self.shared_expert_gate = (ReplicatedLinear(hidden_size, 1, False, ctx.dtype)
                                       if spec.shared_gate else None)
        else:
            self.shared_expert = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x.float() if self.router_fp32 else x))
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: LayerSpec, ctx: ModelBuildContext, prefix: str):
        super().__init__()
        H, eps = spec.hidden_size, spec.rms_norm_eps
        self.input_layernorm = RMSNorm(H, eps, ctx.dtype)
        self.self_attn = SelfAttention(spec.attention, H, eps, layer.sliding_window, ctx,
                                       f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(H, eps, ctx.dtype)
        if layer.moe is not None:
            self.mlp = SparseMoeBlock(layer.moe, H, spec.hidden_act, ctx, f"{prefix}.mlp")
        else:
            self.mlp = GatedMLP(H, layer.dense_intermediate_size, spec.hidden_act, ctx,
                                f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class MoEModel(nn.Module):
    def __init__(self, spec: DecoderSpec, ctx: ModelBuildContext):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, ctx.dtype,
                                                   ctx.parallel.tp)
        self.layers = nn.ModuleList(DecoderLayer(spec, layer, ctx, f"model.layers.{i}")
                                    for i, layer in enumerate(spec.layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, ctx.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


# `<experts>.<e>.<proj>.<tensor>`: weight, bias, or a quantized checkpoint's
# weight_scale / weight_scale_inv / input_scale / weight_packed / ... (each
# loads into the quant method's `w13_<tensor>` / `w2_<tensor>` parameter)
_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.(weight\w*|bias|input_\w+)$")


class MoEForCausalLM(nn.Module):
    """A causal LM over ``MoEModel``. Subclasses (one per architecture)
    implement ``decoder_spec`` and declare their checkpoint conventions."""

    # (checkpoint substring, module substring) renames, applied in order to
    # checkpoint keys and adapter keys alike.
    checkpoint_renames: ClassVar[list[tuple[str, str]]] = []
    # per-expert projection name on disk -> FusedMoE shard id
    expert_shards: ClassVar[dict[str, str]] = {"gate_proj": "w1", "up_proj": "w3",
                                               "down_proj": "w2"}
    # fused module -> the on-disk modules it packs (shard ids are positions)
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    # Stacked expert parameters in transformers are [E, out, in] for most
    # models and [E, in, out] for some (GPT-OSS); legacy 3D adapters depend on it.
    experts_out_in_layout: ClassVar[bool] = True
    # Checkpoints store stacked experts as [E, in, out] (GPT-OSS).
    fused_experts_transposed: ClassVar[bool] = False
    # Expert LoRA as one fused gate_up factor pair per expert (True) or
    # separate gate and up factors (False).
    moe_lora_fused_w13: ClassVar[bool] = False

    def __init__(self, ctx: ModelBuildContext):
        super().__init__()
        self.ctx = ctx
        self.spec = self.decoder_spec(ctx.hf_config)
        self.model = MoEModel(self.spec, ctx)
        self.lm_head = ParallelLMHead(self.spec.vocab_size, self.spec.hidden_size, ctx.dtype,
                                      ctx.parallel.tp)
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def decoder_spec(cls, hf_config: Any) -> DecoderSpec:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    # -- loading ----------------------------------------------------------------
    @classmethod
    def rename_checkpoint_key(cls, name: str) -> str:
        for old, new in cls.checkpoint_renames:
            name = name.replace(old, new)
        return name

    def skip_checkpoint_key(self, name: str) -> bool:
        """Keys that are present in checkpoints but have no parameter here."""
        if name.endswith("rotary_emb.inv_freq"):
            return True
        if self.spec.tie_word_embeddings and name == "lm_head.weight":
            return True
        quant = self.ctx.quant_config
        if quant is not None and quant.skip_checkpoint_key(name):
            return True
        m = re.match(r"model\.layers\.(\d+)\.", name)
        # e.g. GLM-4.5's multi-token-prediction layers after the last decoder layer
        return m is not None and int(m.group(1)) >= len(self.spec.layers)

    def load_fused_expert_tensor(self, module: FusedMoE, param_name: str, tensor: torch.Tensor
                                 ) -> list[tuple[str, tuple[str, int]]]:
        """Load a tensor stacking every expert, named ``<experts>.<param_name>``:
        ``gate_up_proj`` / ``down_proj`` (+ ``_bias``). Stored ``[E, out, in]``
        (transformers' in-memory layout, gate rows then up rows) unless the
        architecture declares ``fused_experts_transposed`` (``[E, in, out]``,
        GPT-OSS). Returns the (parameter, (shard id, expert)) pairs loaded."""
        base, _, kind = param_name.rpartition("_")
        if kind not in ("bias", "blocks", "scales"):
            base, kind = param_name, "weight"
        shard = {"gate_up_proj": "w13", "down_proj": "w2"}.get(base)
        # MXFP4 (GPT-OSS): `_blocks [E, out, in / 32, 16]` packed E2M1 pairs and
        # `_scales [E, out, in / 32]`, output rows first (not transposed)
        dims = {"weight": 3, "bias": 2, "blocks": 4, "scales": 3}[kind]
        if shard is None or tensor.dim() != dims:
            raise WeightShapeError(f"unexpected stacked expert tensor {param_name!r}")
        target = f"{shard}_{ {'blocks': 'weight', 'scales': 'weight_scale'}.get(kind, kind)}"
        param = getattr(module, target, None)
        if param is None or (kind in ("blocks", "scales")) != bool(getattr(param, "quant_param",
                                                                            False)):
            raise WeightShapeError(f"stacked expert tensor {param_name!r} does not fit this "
                                   "model's (quantization) config")
        for e in range(tensor.shape[0]):
            part = tensor[e]
            if kind == "blocks":
                part = part.reshape(part.shape[0], -1)
            elif kind == "weight" and self.fused_experts_transposed:
                part = part.T
            module.weight_loader(param, part, shard, e)
        return [(target, (shard, e)) for e in range(tensor.shape[0])]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters(remove_duplicate=False))
        modules = dict(self.named_modules())
        seen: dict[str, set] = {}

        def load(param_name: str, tensor: torch.Tensor, source: str, *args) -> None:
            if param_name not in params:
                raise CheckpointError(f"unexpected tensor {source!r} in checkpoint "
                                      "(no matching parameter)")
            param = params[param_name]
            loader = getattr(param, "weight_loader", None)
            try:
                if loader is None:
                    if tuple(param.shape) != tuple(tensor.shape):
                        raise WeightShapeError(f"shape {tuple(tensor.shape)} does not match the "
                                               f"expected {tuple(param.shape)}")
                    param.data.copy_(tensor)
                else:
                    loader(param, tensor, *args)
            except WeightShapeError as e:
                raise CheckpointError(f"checkpoint tensor {source!r}: {e}") from None
            seen.setdefault(param_name, set()).add(args)

        stacked = [(f".{shard}.", f".{packed}.", i)
                   for packed, shards in self.packed_modules_mapping.items()
                   for i, shard in enumerate(shards)]
        for source, tensor in weights:
            name = self.rename_checkpoint_key(source)
            if self.skip_checkpoint_key(name):
                continue
            m = _EXPERT_KEY.match(name)
            if m and m.group(3) in self.expert_shards:
                prefix, expert, proj, kind = m.groups()
                load(f"{prefix}.{'w2' if self.expert_shards[proj] == 'w2' else 'w13'}_{kind}",
                     tensor, source, self.expert_shards[proj], int(expert))
                continue
            owner, leaf = name.rsplit(".", 1)
            if isinstance(modules.get(owner), FusedMoE) and name not in params:
                try:
                    loaded = self.load_fused_expert_tensor(modules[owner], leaf, tensor)
                except WeightShapeError as e:
                    raise CheckpointError(f"checkpoint tensor {source!r}: {e}") from None
                for param_name, args in loaded:
                    seen.setdefault(f"{owner}.{param_name}", set()).add(args)
                continue
            for shard, packed, shard_id in stacked:
                if shard in name and name.replace(shard, packed) in params:
                    load(name.replace(shard, packed), tensor, source, shard_id)
                    break
            else:
                load(name, tensor, source)
        self._check_complete(params, modules, seen)

    def _check_complete(self, params: dict[str, nn.Parameter], modules: dict[str, nn.Module],
                        seen: dict[str, set]) -> None:
        missing = []
        for name, param in params.items():
            owner_name, leaf = name.rsplit(".", 1)
            owner = modules[owner_name]
            got = seen.get(name, set())
            if isinstance(owner, FusedMoE) and leaf.startswith(("w13_", "w2_")):
                shards = ("w2",) if leaf.startswith("w2_") else ("w1", "w3")
                have = {(s, e) for s0, e in got for s in (shards if s0 == "w13" else (s0,))}
                lost = [f"expert {e} {s}" for e in range(owner.moe_config.num_experts)
                        for s in shards if (s, e) not in have]
                if lost:
                    missing.append(f"{name} ({', '.join(lost[:4])}{', ...' if len(lost) > 4 else ''})")
            elif len(getattr(owner, "output_sizes", ())) > 1:
                lost = [str(i) for i in range(len(owner.output_sizes)) if (i,) not in got]
                if lost:
                    missing.append(f"{name} (shards {', '.join(lost)})")
            elif not got and not (self.spec.tie_word_embeddings and name == "lm_head.weight"):
                missing.append(name)
        if missing:
            raise CheckpointError("checkpoint is missing tensors for: " + "; ".join(missing[:8])
                                  + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


def attention_spec(hf_config: Any, **overrides: Any) -> AttentionSpec:
    """The attention settings every supported config spells the same way."""
    from vllm.model_executor.layers.rotary_embedding import rope_parameters
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    rope = rope_parameters(hf_config)
    rotary_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    spec = AttentionSpec(num_heads=heads,
                         num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
                         head_dim=head_dim, rotary_dim=rotary_dim, rope=rope)
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec


def is_sparse_layer(hf_config: Any, index: int) -> bool:
    """Qwen-style choice of MoE vs dense layers (mlp_only_layers, decoder_sparse_step)."""
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    return index not in (getattr(hf_config, "mlp_only_layers", None) or []) and \
        (index + 1) % step == 0


def layer_window(hf_config: Any, index: int) -> int | None:
    """Sliding window of layer ``index``: per ``layer_types`` when the config
    has them, else the config-wide ``sliding_window`` (None: full attention)."""
    window = getattr(hf_config, "sliding_window", None) or None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[index] == "sliding_attention" else None
    return window
