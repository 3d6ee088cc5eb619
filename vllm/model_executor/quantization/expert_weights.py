"""What quantized experts classes receive in ``ExpertWeights.quant``.

Quant methods normalise every checkpoint layout into one of these after
loading, so experts classes see one layout per family:

- ``Fp8ExpertQuant``: ``w13``/``w2`` are float8_e4m3fn ``[E, N, K]``; scales
  per output row (``[E, N]``: per-tensor scales are expanded to rows) or per
  output row and K block (``[E, N, ceil(K / block_k)]``: 2-D block scales
  expanded to rows); ``act`` says how GEMM inputs are quantized (None:
  weight-only, activations stay in the model dtype).
- ``PackedExpertQuant``: ``w13``/``w2`` are 4-bit codes packed two per byte,
  uint8 ``[E, N, K / 2]`` (low nibble first); ``scale`` is per output row
  and group of ``group_size`` K values, as float (INT4) or the raw E4M3 /
  E8M0 bytes (NVFP4 / MXFP4); ``channel_scale`` an optional float32
  multiplier per output row (NVFP4's per-tensor global scale).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm.model_executor.quantization.dequant import dequant_fp4, dequant_fp8, dequant_int4
from vllm.model_executor.quantization.fp8_activation import Fp8ActScheme


@dataclass
class Fp8ExpertQuant:
    w13_scale: torch.Tensor                  # [E, 2I] or [E, 2I, ceil(H / block_k)]
    w2_scale: torch.Tensor                   # [E, H] or [E, H, ceil(I / block_k)]
    block_k: int | None                      # None: per-channel scales
    act: Fp8ActScheme | None                 # None: weight-only (W8A16)
    w13_input_scale: torch.Tensor | None = None  # static activation scales (scalars)
    w2_input_scale: torch.Tensor | None = None

    def scale(self, which: str) -> torch.Tensor:
        return self.w13_scale if which == "w13" else self.w2_scale

    def input_scale(self, which: str) -> torch.Tensor | None:
        return self.w13_input_scale if which == "w13" else self.w2_input_scale

    def dequant(self, weight: torch.Tensor, which: str, e: int) -> torch.Tensor:
        """float32 ``[N, K]`` of expert e."""
        block = None if self.block_k is None else (1, self.block_k)
        return dequant_fp8(weight[e], self.scale(which)[e], block)


@dataclass
class PackedExpertQuant:
    format: str                              # "int4", "nvfp4" or "mxfp4"
    group_size: int
    w13_scale: torch.Tensor                  # [E, 2I, H / g]
    w2_scale: torch.Tensor                   # [E, H, I / g]
    w13_channel_scale: torch.Tensor | None = None  # [E, 2I] float32
    w2_channel_scale: torch.Tensor | None = None   # [E, H] float32

    def scale(self, which: str) -> torch.Tensor:
        return self.w13_scale if which == "w13" else self.w2_scale

    def channel_scale(self, which: str) -> torch.Tensor | None:
        return self.w13_channel_scale if which == "w13" else self.w2_channel_scale

    def dequant(self, packed: torch.Tensor, which: str, e: int) -> torch.Tensor:
        """float32 ``[N, K]`` of expert e."""
        scale = self.scale(which)[e]
        if self.format == "int4":
            w = dequant_int4(packed[e], scale, self.group_size)
        else:
            w = dequant_fp4(packed[e], scale, self.group_size,
                            "e4m3" if self.format == "nvfp4" else "e8m0")
        channel = self.channel_scale(which)
        return w if channel is None else w * channel[e].unsqueeze(1)
