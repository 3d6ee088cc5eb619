"""FP8 (E4M3) weights for linear layers and routed experts, and the
Hugging Face ``fp8`` checkpoint config.

Weight scales come per tensor, per output channel or per 2-D block; they
are normalised after loading to one layout per family: per output row
(per-tensor scales of fused projections expanded over each shard's rows)
or per output row and K block (block scales expanded along N). Activations
are quantized per ``Fp8ActScheme`` for the base GEMM only; LoRA wrappers
and experts keep reading the unquantized activations.

HF ``fp8`` (``quant_method: fp8``): ``weight`` float8_e4m3fn,
``weight_scale_inv`` per ``weight_block_size`` block (multiplied, despite
the name), activations quantized dynamically per token and group of
``block_k`` columns. ``modules_to_not_convert`` lists unquantized modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vllm.model_executor.layers.fused_moe.experts.base import ExpertWeights
from vllm.model_executor.layers.fused_moe.method import FusedMoEMethodBase
from vllm.model_executor.layers.linear import LinearMethodBase, WeightShapeError, new_param
from vllm.model_executor.quantization.base import (QuantizationConfig, QuantizationError,
                                                   get_field, matches_module_path)
from vllm.model_executor.quantization.dequant import FP8_DTYPE, dequant_fp8
from vllm.model_executor.quantization.expert_weights import Fp8ExpertQuant
from vllm.model_executor.quantization.fp8_activation import (Fp8ActScheme, fake_quantize_fp8_act,
                                                             quantize_fp8_act)


@dataclass(frozen=True)
class Fp8Scheme:
    weight: str                        # "tensor", "channel" or "block"
    act: Fp8ActScheme | None           # None: weight-only (W8A16)
    block: tuple[int, int] | None = None   # (block_n, block_k) for "block"
    scale_name: str = "weight_scale"   # checkpoint suffix of the weight scale

    def __post_init__(self):
        if self.weight not in ("tensor", "channel", "block"):
            raise QuantizationError(f"unsupported FP8 weight scale granularity {self.weight!r}")
        if (self.weight == "block") != (self.block is not None):
            raise QuantizationError("FP8 block scales need a block size (and only they)")
        if self.act is not None and self.act.kind == "group" and self.weight != "block":
            raise QuantizationError("per-token-group FP8 activations need block-scaled weights")

    def describe(self) -> str:
        act = "W8A16" if self.act is None else f"activations {self.act.kind}"
        blk = f" {self.block[0]}x{self.block[1]}" if self.block else ""
        return f"FP8 {self.weight}{blk} weights, {act}"


def _replace(layer: nn.Module, name: str, value: torch.Tensor | None) -> None:
    if value is None:
        if hasattr(layer, name):
            delattr(layer, name)
        return
    setattr(layer, name, nn.Parameter(value, requires_grad=False))


def shard_scalar_loader(layer):
    """Per-tensor scales of a (possibly fused) linear: one value per shard."""
    def load(param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if loaded.numel() != 1:
            raise WeightShapeError(f"shape {tuple(loaded.shape)} is not a per-tensor scalar")
        index = 0 if shard_id is None else layer._shard_index(shard_id)
        param.data[index] = loaded.reshape(()).float()
    return load


def rows_loader(layer, rows_per: int = 1):
    """Scales with one value per output row (a trailing unit dim allowed on
    disk), or per block of ``rows_per`` rows on disk, expanded to rows."""
    def load(param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if loaded.dim() == param.dim() + 1 and loaded.shape[-1] == 1:
            loaded = loaded.squeeze(-1)
        if rows_per > 1:
            index = 0 if shard_id is None else layer._shard_index(shard_id)
            full = layer.output_sizes[index]
            if loaded.shape[0] != -(-full // rows_per):
                raise WeightShapeError(f"block scale shape {tuple(loaded.shape)} does not cover "
                                       f"{full} rows in blocks of {rows_per}")
            loaded = loaded.repeat_interleave(rows_per, dim=0)[:full]
        layer.weight_loader(param, loaded, shard_id)
    return load


def rows_from_shards(values: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """One value per shard -> one per output row."""
    return torch.cat([values[i].expand(n) for i, n in enumerate(sizes)])


class Fp8LinearMethod(LinearMethodBase):
    """FP8 weights ``[out, in]``; after loading ``weight_scale`` is per row
    ``[out]`` or per row and K block ``[out, ceil(in / bk)]``, and a static
    ``input_scale`` is one scalar (the max over fused shards)."""

    def __init__(self, scheme: Fp8Scheme):
        self.scheme = scheme

    def create_weights(self, layer, input_size, output_sizes, params_dtype):
        s = self.scheme
        n = sum(output_sizes)
        layer.register_parameter("weight", new_param((n, input_size), FP8_DTYPE, input_dim=1,
                                                  output_dim=0,
                                                  weight_loader=layer.weight_loader))
        if s.weight == "block":
            bn, bk = s.block
            if layer.shard_input and input_size % bk:
                raise QuantizationError(f"{s.describe()}: input partition {input_size} is not a "
                                        f"multiple of the block size {bk}")
            scale = new_param((n, -(-input_size // bk)), torch.float32, output_dim=0, input_dim=1,
                           weight_loader=rows_loader(layer, bn))
        elif s.weight == "channel":
            scale = new_param((n,), torch.float32, output_dim=0, weight_loader=rows_loader(layer))
        else:
            scale = new_param((len(output_sizes),), torch.float32,
                           weight_loader=shard_scalar_loader(layer))
        layer.register_parameter(s.scale_name, scale)
        if s.act is not None and s.act.kind == "static":
            layer.register_parameter("input_scale", new_param(
                (len(output_sizes),), torch.float32, weight_loader=shard_scalar_loader(layer)))

    def process_weights_after_loading(self, layer):
        s = self.scheme
        scale = getattr(layer, s.scale_name).data
        if s.scale_name != "weight_scale":
            delattr(layer, s.scale_name)
        if s.weight == "tensor":
            scale = rows_from_shards(scale, layer.output_partition_sizes)
        _replace(layer, "weight_scale", scale.contiguous())
        if s.act is not None and s.act.kind == "static":
            _replace(layer, "input_scale", layer.input_scale.data.max().reshape(()))

    def apply(self, layer, x, bias=None):
        s = self.scheme
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        static = getattr(layer, "input_scale", None)
        if self._scaled_mm_ok(layer, x2):
            q, xs = quantize_fp8_act(x2, s.act, static)
            xs = xs.reshape(-1, 1).expand(x2.shape[0], 1).contiguous()
            y = torch._scaled_mm(q, layer.weight.t(), scale_a=xs,
                                 scale_b=layer.weight_scale.reshape(1, -1), bias=bias,
                                 out_dtype=x.dtype)
            return y.reshape(*shape[:-1], -1)
        block = (1, s.block[1]) if s.weight == "block" else None
        w = dequant_fp8(layer.weight, layer.weight_scale, block).to(x.dtype)
        if s.act is not None:
            x2 = fake_quantize_fp8_act(x2, s.act, static)
        return F.linear(x2, w, bias).reshape(*shape[:-1], -1)

    def _scaled_mm_ok(self, layer, x2: torch.Tensor) -> bool:
        """torch._scaled_mm with row-wise scales (Hopper+, bf16 out, 16-aligned)."""
        s = self.scheme
        if not x2.is_cuda or s.act is None or s.weight == "block" or s.act.kind == "group":
            return False
        if x2.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x2.device) < (9, 0):
            return False
        n, k = layer.weight.shape
        return k % 16 == 0 and n % 16 == 0


class Fp8MoEMethod(FusedMoEMethodBase):
    """FP8 routed experts. Checkpoint tensors per expert and projection:
    ``weight`` and ``<scale_name>`` (+ ``input_scale`` for static
    activations), loaded into ``w13_*`` / ``w2_*`` parameters."""

    def __init__(self, fp8: Fp8Scheme):
        self.fp8 = fp8
        # the experts classes tell W8A8 from weight-only by the scheme name
        self.scheme = "fp8" if fp8.act is not None else "fp8_w8a16"

    def create_weights(self, layer):
        cfg = layer.moe_config
        s = self.fp8
        E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        loader = layer.weight_loader
        layer.w13_weight = new_param((E, 2 * I, H), FP8_DTYPE, weight_loader=loader)
        layer.w2_weight = new_param((E, H, I), FP8_DTYPE, weight_loader=loader)
        if cfg.has_bias:
            layer.w13_bias = new_param((E, 2 * I), cfg.dtype, weight_loader=loader)
            layer.w2_bias = new_param((E, H), cfg.dtype, weight_loader=loader)
        quant = dict(quant_param=True, weight_loader=loader)
        if s.weight == "block":
            bn, bk = s.block
            if cfg.tp_size > 1 and I % bk:
                raise QuantizationError(f"{s.describe()}: the per-rank intermediate size {I} is "
                                        f"not a multiple of the block size {bk}")
            w13 = new_param((E, 2 * I, -(-H // bk)), torch.float32, quant_rows=bn, quant_cols=bk,
                         **quant)
            w2 = new_param((E, H, -(-I // bk)), torch.float32, quant_rows=bn, quant_cols=bk, **quant)
        elif s.weight == "channel":
            w13 = new_param((E, 2 * I), torch.float32, **quant)
            w2 = new_param((E, H), torch.float32, **quant)
        else:
            w13 = new_param((E, 2), torch.float32, expert_scalar=True, **quant)
            w2 = new_param((E,), torch.float32, expert_scalar=True, **quant)
        setattr(layer, f"w13_{s.scale_name}", w13)
        setattr(layer, f"w2_{s.scale_name}", w2)
        if s.act is not None and s.act.kind == "static":
            layer.w13_input_scale = new_param((E, 2), torch.float32, expert_scalar=True, **quant)
            layer.w2_input_scale = new_param((E,), torch.float32, expert_scalar=True, **quant)

    def process_weights_after_loading(self, layer):
        s = self.fp8
        I = layer.moe_config.intermediate_size
        scales = {}
        for which in ("w13", "w2"):
            scale = getattr(layer, f"{which}_{s.scale_name}").data
            if s.weight == "tensor":
                rows = 2 * I if which == "w13" else layer.moe_config.hidden_size
                if which == "w13":
                    if layer.moe_config.activation.interleaved:
                        scale = scale.repeat(1, I)
                    else:
                        scale = scale.repeat_interleave(I, dim=1)
                else:
                    scale = scale.unsqueeze(1).expand(-1, rows)
            scales[which] = scale.contiguous()
            delattr(layer, f"{which}_{s.scale_name}")
        layer.w13_weight_scale = nn.Parameter(scales["w13"], requires_grad=False)
        layer.w2_weight_scale = nn.Parameter(scales["w2"], requires_grad=False)
        if s.act is not None and s.act.kind == "static":
            # one activation scale per GEMM input: the max over experts (as upstream)
            _replace(layer, "w13_input_scale", layer.w13_input_scale.data.max().reshape(1))
            _replace(layer, "w2_input_scale", layer.w2_input_scale.data.max().reshape(1))

    def expert_weights(self, layer) -> ExpertWeights:
        s = self.fp8
        quant = Fp8ExpertQuant(
            w13_scale=layer.w13_weight_scale, w2_scale=layer.w2_weight_scale,
            block_k=s.block[1] if s.weight == "block" else None, act=s.act,
            w13_input_scale=getattr(layer, "w13_input_scale", None),
            w2_input_scale=getattr(layer, "w2_input_scale", None))
        return ExpertWeights(layer.w13_weight, layer.w2_weight, getattr(layer, "w13_bias", None),
                             getattr(layer, "w2_bias", None), quant=quant)

    def backends(self):
        from vllm.model_executor.layers.fused_moe.oracle import fp8_backends
        return fp8_backends()


class Fp8Config(QuantizationConfig):
    """HF ``quant_method: fp8``: block-scaled E4M3 weights, dynamic
    per-token-group activations."""
    name = "fp8"

    def __init__(self, architecture: str, cfg: dict[str, Any]):
        super().__init__(architecture)
        fmt = cfg.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise QuantizationError(f"fp8: weight format {fmt!r} is not supported (only e4m3)")
        act = cfg.get("activation_scheme", "dynamic")
        block = cfg.get("weight_block_size")
        if block is None:
            # per-tensor weights; dynamic per-tensor or static activations
            self.fp8 = Fp8Scheme("tensor", Fp8ActScheme("tensor" if act == "dynamic" else "static"),
                                 scale_name="weight_scale")
        else:
            if act != "dynamic":
                raise QuantizationError(f"fp8: block-scaled weights with {act!r} activations are "
                                        "not supported (only dynamic)")
            bn, bk = (int(b) for b in block)
            self.fp8 = Fp8Scheme("block", Fp8ActScheme("group", bk), (bn, bk),
                                 scale_name="weight_scale_inv")
        self.ignore = list(get_field(cfg, "modules_to_not_convert", "ignored_layers",
                                     default=[]) or [])

    def _quantized(self, name: str) -> bool:
        return not any(matches_module_path(name, p)
                       for p in self.ignore)

    def linear_method(self, prefix):
        return Fp8LinearMethod(self.fp8) if self.resolve(prefix, self._quantized) else None

    def moe_method(self, prefix):
        return Fp8MoEMethod(self.fp8) if self.resolve(prefix, self._quantized) else None
