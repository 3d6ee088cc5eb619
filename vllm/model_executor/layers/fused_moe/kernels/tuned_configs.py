"""Tuned launch configurations of the unquantized expert GEMMs, per device.

Files in ``configs/`` next to this module (and in ``$VLLM_TUNED_CONFIG_DIR``,
which is searched first) are named
``E=<experts>,H=<hidden>,I=<intermediate>,dtype=<dtype>,device=<device>.json``
and map a token count to the configs of both GEMMs of one MoE layer::

    {"64": {"w13": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, ...}, "w2": {...}}}

Both GEMMs share BLOCK_SIZE_M, because one alignment of the routed pairs
serves both. An entry may also hold ``w13_lora`` / ``w2_lora``: the configs
of GEMMs that add MoE LoRA in their epilogue (same BLOCK_SIZE_M; the
epilogue's registers and latency favour other tiles). A step takes the
entry of the nearest token count; with no file for the shape and device,
the heuristics of ``fused_moe_gemm`` apply. ``benchmarks/kernels/tune_moe.py``
writes these files (``--lora`` the LoRA configs).
"""
from __future__ import annotations

import functools
import json
import os

import torch
import triton

from vllm import envs
from vllm.model_executor.layers.fused_moe.kernels.fused_moe_gemm import (default_config,
                                                                         moe_block_size)

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


@functools.lru_cache(maxsize=None)
def device_key() -> str:
    """The device name in config file names (asked once: a driver query)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "_")
    return "cpu"


def config_filename(E: int, H: int, I: int, dtype: torch.dtype, device: str) -> str:
    return f"E={E},H={H},I={I},dtype={str(dtype).removeprefix('torch.')},device={device}.json"


@functools.lru_cache(maxsize=None)
def load_table(filename: str) -> dict[int, dict] | None:
    for directory in (envs.VLLM_TUNED_CONFIG_DIR, CONFIG_DIR):
        if directory and os.path.isfile(os.path.join(directory, filename)):
            with open(os.path.join(directory, filename)) as f:
                return {int(tokens): entry for tokens, entry in json.load(f).items()}
    return None


def nearest_entry(table: dict[int, dict], num_tokens: int) -> dict:
    """The entry of the token count nearest to ``num_tokens`` (the smaller on a tie)."""
    return table[min(table, key=lambda t: (abs(t - num_tokens), t))]


def expert_gemm_configs(num_tokens: int, top_k: int, E: int, H: int, I: int,
                        dtype: torch.dtype, lora: bool = False) -> tuple[dict, dict]:
    """(GEMM-1 config, GEMM-2 config) for a step of ``num_tokens`` tokens;
    ``lora``: for GEMMs that add LoRA (the base configs where none is tuned)."""
    table = load_table(config_filename(E, H, I, dtype, device_key()))
    if table:
        entry = nearest_entry(table, num_tokens)
        base = entry["w13"], entry["w2"]
        if lora and "w13_lora" in entry:
            tuned = entry["w13_lora"], entry["w2_lora"]
            # one alignment serves both GEMMs: LoRA configs of another block size do not fit
            if all(t["BLOCK_SIZE_M"] == b["BLOCK_SIZE_M"] for t, b in zip(tuned, base)):
                return tuned
        return base
    untuned = expert_gemm_configs_untuned(num_tokens, top_k, E, H, I, dtype)
    if lora:  # the LoRA epilogue's operands need shared memory beside the pipeline's
        return tuple(dict(c, num_stages=min(c["num_stages"], 3)) for c in untuned)
    return untuned


def expert_gemm_configs_untuned(num_tokens: int, top_k: int, E: int, H: int, I: int,
                                dtype: torch.dtype) -> tuple[dict, dict]:
    """``expert_gemm_configs`` of a shape without a table: the heuristics.

    From 64 pairs per expert, 16-bit GEMMs take 128 x 256 tiles with 8 warps
    and 4 stages where shared memory holds them: on the H100 that beat
    ``default_config`` by 1.11 / 1.56 / 1.05x on a Mixtral-8x7B layer and
    1.18 / 1.26 / 1.07x on a GPT-OSS-20B one at 512 / 2048 / 8192 tokens
    (``tune_moe.py --space wide``, RESULTS.md session 8), and it is what the
    Qwen3-30B-A3B tuning picked from 2048 tokens."""
    stages = min(4, _shared_memory_bytes() // WIDE_TILE_STAGE_BYTES)
    if num_tokens * top_k >= 64 * E and dtype.itemsize == 2 and stages >= 3:
        return tuple({"BLOCK_SIZE_M": 128,
                      "BLOCK_SIZE_N": max(16, min(256, triton.next_power_of_2(N))),
                      "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 16, "num_warps": 8,
                      "num_stages": stages} for N in (2 * I, H))
    block = moe_block_size(num_tokens * top_k, E)
    return default_config(block, 2 * I, H, dtype), default_config(block, H, I, dtype)


# One pipeline stage of a 128 x 256 tile over 64-wide K steps, 16-bit operands.
WIDE_TILE_STAGE_BYTES = (128 * 64 + 64 * 256) * 2


@functools.lru_cache(maxsize=None)
def _shared_memory_bytes() -> int:
    """Shared memory one program may use on this device (0 without CUDA):
    the limit Triton checks launches against."""
    if not torch.cuda.is_available():
        return 0
    return triton.runtime.driver.active.utils.get_device_properties(
        torch.cuda.current_device())["max_shared_mem"]


def lora_gemm_configs_tuned(num_tokens: int, E: int, H: int, I: int, dtype: torch.dtype) -> bool:
    """Whether the entry a step of ``num_tokens`` tokens takes has configs
    tuned for GEMMs that add LoRA."""
    table = load_table(config_filename(E, H, I, dtype, device_key()))
    if not table:
        return False
    return "w13_lora" in nearest_entry(table, num_tokens)
