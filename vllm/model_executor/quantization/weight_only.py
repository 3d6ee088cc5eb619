"""4-bit weight-only schemes: INT4 (compressed-tensors ``pack-quantized``
W4A16), NVFP4 (compressed-tensors ``nvfp4-pack-quantized`` and ModelOpt)
and MXFP4 (GPT-OSS) for routed experts and linear layers.

Checkpoint layouts (``PackedScheme`` names the tensors):
- INT4: ``weight_packed`` int32 ``[N, K / 8]`` (+ ``weight_shape``),
  ``weight_scale [N, K / g]`` in the model dtype;
- NVFP4 (compressed-tensors): ``weight_packed`` uint8 ``[N, K / 2]``,
  ``weight_scale`` E4M3 ``[N, K / 16]``, ``weight_global_scale`` (a divisor:
  ``w = q * s / global``), ``input_global_scale`` (activations; unused);
- NVFP4 (ModelOpt): ``weight`` uint8, ``weight_scale`` E4M3,
  ``weight_scale_2`` (a multiplier), ``input_scale`` (unused);
- MXFP4 (GPT-OSS, stacked experts only): ``*_blocks [E, N, K / 32, 16]``,
  ``*_scales`` E8M0 ``[E, N, K / 32]``.

NVFP4 checkpoints that also quantize activations (W4A4) run here as
W4A16: activations stay unquantized (what Marlin does upstream on GPUs
without FP4 tensor cores), and their activation scales are skipped at load.

Experts keep the packed codes and decode them in the GEMM
(``PackedExpertQuant``); linear layers are small next to the experts and
are dequantized once after loading into a dense weight.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

from vllm.model_executor.layers.fused_moe.experts.base import ExpertWeights
from vllm.model_executor.layers.fused_moe.method import FusedMoEMethodBase
from vllm.model_executor.layers.linear import LinearMethodBase, new_param
from vllm.model_executor.quantization.base import QuantizationError
from vllm.model_executor.quantization.dequant import (dequant_fp4, dequant_int4,
                                                      int32_words_to_bytes)
from vllm.model_executor.quantization.expert_weights import PackedExpertQuant
from vllm.model_executor.quantization.fp8 import rows_from_shards, shard_scalar_loader


@dataclass(frozen=True)
class PackedScheme:
    format: str                     # "int4", "nvfp4" or "mxfp4"
    group_size: int
    weight_name: str = "weight_packed"
    scale_name: str = "weight_scale"
    global_name: str | None = None  # per-tensor NVFP4 scale on disk
    global_is_divisor: bool = True  # compressed-tensors divides, ModelOpt multiplies

    def __post_init__(self):
        if self.format not in ("int4", "nvfp4", "mxfp4"):
            raise QuantizationError(f"unsupported 4-bit weight format {self.format!r}")
        if self.group_size <= 0 or self.group_size % 2:
            raise QuantizationError(f"{self.format}: group size {self.group_size} is not supported")

    @property
    def scale_dtype(self) -> torch.dtype | None:
        """Stored scale dtype (None: the model dtype, INT4's float scales)."""
        return None if self.format == "int4" else torch.uint8

    def describe(self) -> str:
        return f"{self.format} weights in groups of {self.group_size}"

    def dequant(self, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.format == "int4":
            return dequant_int4(packed, scale, self.group_size)
        return dequant_fp4(packed, scale, self.group_size,
                           "e4m3" if self.format == "nvfp4" else "e8m0")


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Packed codes or FP8/E8M0 scales as raw uint8 (int32 words -> bytes)."""
    if t.dtype == torch.int32:
        return int32_words_to_bytes(t)
    if t.dtype in (torch.uint8, torch.int8, torch.float8_e4m3fn):
        return t.contiguous().view(torch.uint8)
    raise QuantizationError(f"packed 4-bit tensor of dtype {t.dtype} is not supported")


def _converting(loader, convert):
    def load(param, loaded, *args):
        loader(param, convert(loaded), *args)
    return load


def _check_k(scheme: PackedScheme, k: int, what: str) -> None:
    if k % scheme.group_size:
        raise QuantizationError(f"{scheme.describe()}: {what} {k} is not a multiple of the "
                                f"group size")


class WeightOnlyLinearMethod(LinearMethodBase):
    def __init__(self, scheme: PackedScheme):
        if scheme.format == "mxfp4":
            raise QuantizationError("MXFP4 linear layers are not supported (GPT-OSS quantizes "
                                    "only its experts)")
        self.scheme = scheme

    def create_weights(self, layer, input_size, output_sizes, params_dtype):
        s = self.scheme
        _check_k(s, input_size, "input size")
        n = sum(output_sizes)
        loader = layer.weight_loader
        layer.register_parameter(s.weight_name, new_param(
            (n, input_size // 2), torch.uint8, output_dim=0, input_dim=1,
            weight_loader=_converting(loader, as_bytes)))
        scale_dtype = s.scale_dtype or params_dtype
        convert = as_bytes if s.scale_dtype == torch.uint8 else (lambda t: t)
        layer.register_parameter(s.scale_name, new_param(
            (n, input_size // s.group_size), scale_dtype, output_dim=0, input_dim=1,
            weight_loader=_converting(loader, convert)))
        if s.global_name:
            layer.register_parameter(s.global_name, new_param(
                (len(output_sizes),), torch.float32, weight_loader=shard_scalar_loader(layer)))

    def process_weights_after_loading(self, layer):
        s = self.scheme
        w = s.dequant(getattr(layer, s.weight_name).data, getattr(layer, s.scale_name).data)
        if s.global_name:
            g = getattr(layer, s.global_name).data.float()
            g = 1.0 / g if s.global_is_divisor else g
            w = w * rows_from_shards(g, layer.output_partition_sizes).unsqueeze(1)
        for name in {s.weight_name, s.scale_name, s.global_name} - {None}:
            delattr(layer, name)
        layer.weight = nn.Parameter(w.to(layer.params_dtype), requires_grad=False)

    def apply(self, layer, x, bias=None):
        return F.linear(x, layer.weight, bias)


class WeightOnlyMoEMethod(FusedMoEMethodBase):
    """Packed 4-bit experts; after loading ``w13_weight`` / ``w2_weight`` are
    uint8 ``[E, N, K / 2]``, ``w*_weight_scale`` ``[E, N, K / g]`` and
    ``w*_channel_scale`` ``[E, N]`` (NVFP4's global scale, per row)."""

    def __init__(self, scheme: PackedScheme):
        self.packed = scheme
        self.scheme = scheme.format
        self.group_size = scheme.group_size

    def create_weights(self, layer):
        cfg = layer.moe_config
        s = self.packed
        E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        _check_k(s, H, "hidden size")
        _check_k(s, I, "per-rank intermediate size")
        loader = layer.weight_loader
        quant = dict(quant_param=True)
        to_bytes = _converting(loader, as_bytes)
        setattr(layer, f"w13_{s.weight_name}",
                new_param((E, 2 * I, H // 2), torch.uint8, weight_loader=to_bytes, **quant))
        setattr(layer, f"w2_{s.weight_name}",
                new_param((E, H, I // 2), torch.uint8, quant_cols=2, weight_loader=to_bytes,
                       **quant))
        scale_dtype = s.scale_dtype or cfg.dtype
        scale_loader = to_bytes if s.scale_dtype == torch.uint8 else loader
        g = s.group_size
        setattr(layer, f"w13_{s.scale_name}",
                new_param((E, 2 * I, H // g), scale_dtype, weight_loader=scale_loader, **quant))
        setattr(layer, f"w2_{s.scale_name}",
                new_param((E, H, I // g), scale_dtype, quant_cols=g, weight_loader=scale_loader,
                       **quant))
        if s.global_name:
            setattr(layer, f"w13_{s.global_name}", new_param(
                (E, 2), torch.float32, expert_scalar=True, weight_loader=loader, **quant))
            setattr(layer, f"w2_{s.global_name}", new_param(
                (E,), torch.float32, expert_scalar=True, weight_loader=loader, **quant))
        if cfg.has_bias:
            layer.w13_bias = new_param((E, 2 * I), cfg.dtype, weight_loader=loader)
            layer.w2_bias = new_param((E, H), cfg.dtype, weight_loader=loader)

    def process_weights_after_loading(self, layer):
        s = self.packed
        cfg = layer.moe_config
        I = cfg.intermediate_size
        for which in ("w13", "w2"):
            packed = getattr(layer, f"{which}_{s.weight_name}").data
            scale = getattr(layer, f"{which}_{s.scale_name}").data
            channel = None
            if s.global_name:
                g = getattr(layer, f"{which}_{s.global_name}").data.float()
                g = 1.0 / g if s.global_is_divisor else g
                if which == "w2":
                    channel = g.unsqueeze(1).expand(-1, cfg.hidden_size)
                elif cfg.activation.interleaved:
                    channel = g.repeat(1, I)
                else:
                    channel = g.repeat_interleave(I, dim=1)
                channel = channel.contiguous()
            for name in {s.weight_name, s.scale_name, s.global_name} - {None}:
                delattr(layer, f"{which}_{name}")
            setattr(layer, f"{which}_weight", nn.Parameter(packed, requires_grad=False))
            setattr(layer, f"{which}_weight_scale", nn.Parameter(scale, requires_grad=False))
            if channel is not None:
                setattr(layer, f"{which}_channel_scale",
                        nn.Parameter(channel, requires_grad=False))

    def expert_weights(self, layer) -> ExpertWeights:
        quant = PackedExpertQuant(
            self.packed.format, self.packed.group_size, layer.w13_weight_scale,
            layer.w2_weight_scale, getattr(layer, "w13_channel_scale", None),
            getattr(layer, "w2_channel_scale", None))
        return ExpertWeights(layer.w13_weight, layer.w2_weight, getattr(layer, "w13_bias", None),
                             getattr(layer, "w2_bias", None), quant=quant)

    def backends(self):
        from vllm.model_executor.layers.fused_moe.oracle import weight_only_backends
        return weight_only_backends()
