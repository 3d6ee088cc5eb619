"""Launch parameters of one MoE layer's LoRA kernels for one step.

A file written by ``benchmarks/kernels/tune_moe_lora.py`` for the layer's
shape, adapter slots, rank, dtype and device (searched like the expert GEMM
configs, see ``fused_moe/kernels/tuned_configs.py``) maps a token count to
the alignment block and the shrink / expand configs of both projections::

    {"64": {"block_size_m": 16, "w13": {"shrink": {...}, "expand": {...}}, "w2": {...}}}

An entry may also name where the Triton experts compute LoRA for that many
tokens, ``"fusion": "gemm" | "epilogue" | "loop" | "off"`` (see
``moe_lora_in_gemm``).
The entry of the nearest token count is used; without a file, the
heuristics next to the kernels.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from vllm.lora.ops.triton_ops.fused_moe_lora import (moe_lora_block_size,
                                                     moe_lora_expand_config,
                                                     moe_lora_shrink_config)
from vllm.lora.ops.triton_ops.moe_lora_in_gemm import fused_width
from vllm.model_executor.layers.fused_moe.kernels.tuned_configs import (device_key, load_table,
                                                                       lora_gemm_configs_tuned,
                                                                       nearest_entry)


@dataclass(frozen=True)
class MoELoRALaunch:
    """The alignment block and the four kernel configs of one layer's step
    (block and shrinks serve the expand-in-GEMM path too), and where LoRA
    is computed: "gemm", "epilogue", "loop" or "off" (separate kernels)."""
    block_size_m: int
    w13_shrink: dict[str, Any]
    w13_expand: dict[str, Any]
    w2_shrink: dict[str, Any]
    w2_expand: dict[str, Any]
    fusion: str


def fusion_default(num_tokens: int, width: int, lora_gemms_tuned: bool) -> str:
    """``width``: columns of the side-by-side factor (``fused_width``);
    ``lora_gemms_tuned``: the expert GEMMs have configs tuned for carrying
    LoRA at this size (``tuned_configs.lora_gemm_configs_tuned``).

    Measured on the H100 (RESULTS.md, session 6): up to 256 tokens (16-row
    blocks) the expand in the GEMM epilogue beats separate kernels at width
    64 (4 x rank 16) and loses at 128 and 256 (the side-by-side tile is too
    large), on Qwen3-30B-A3B and GPT-OSS-20B layers. From 512 tokens it
    wins on the Qwen3 layer, whose GEMMs have LoRA configs (width 64 at
    every size, 128 from 512 tokens, 256 from 2048; 10-23% from 2048 tokens,
    where the separate expand's read-modify-write of the GEMM outputs
    dominates), and loses on the GPT-OSS layer with untuned GEMMs."""
    if width <= 64 and num_tokens <= 256:
        return "epilogue"
    if lora_gemms_tuned and (width <= 64 or num_tokens >= 2048
                             or (width <= 128 and num_tokens >= 512)):
        return "epilogue"
    return "off"


def moe_lora_config_filename(E: int, H: int, I: int, rank: int, max_loras: int,
                             dtype: torch.dtype, device: str) -> str:
    return (f"moe_lora,E={E},H={H},I={I},R={rank},L={max_loras},"
            f"dtype={str(dtype).removeprefix('torch.')},device={device}.json")


@functools.lru_cache(maxsize=4096)  # asked per MoE layer per eager step
def moe_lora_launch(num_tokens: int, top_k: int, E: int, H: int, I: int, rank: int,
                    w13_rank: int, max_loras: int, dtype: torch.dtype) -> MoELoRALaunch:
    """``rank``: the slots' rank; ``w13_rank``: the w13 shrink's output
    width (smaller under fully sharded LoRA)."""
    table = load_table(moe_lora_config_filename(E, H, I, rank, max_loras, dtype, device_key()))
    fusion = fusion_default(num_tokens, fused_width(max_loras, rank),
                            lora_gemm_configs_tuned(num_tokens, E, H, I, dtype))
    if table:
        entry = nearest_entry(table, num_tokens)
        return MoELoRALaunch(entry["block_size_m"], entry["w13"]["shrink"],
                             entry["w13"]["expand"], entry["w2"]["shrink"],
                             entry["w2"]["expand"],
                             entry.get("fusion", fusion))
    pairs = num_tokens * top_k
    block = moe_lora_block_size(pairs, E, max_loras)
    return MoELoRALaunch(block, moe_lora_shrink_config(pairs, H, w13_rank, block, dtype),
                         moe_lora_expand_config(I, block),
                         moe_lora_shrink_config(pairs, I, rank, block, dtype),
                         moe_lora_expand_config(H, block), fusion)
