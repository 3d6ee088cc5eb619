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
    block = moe_block_size(num_tokens * top_k, E)
    return default_config(block, 2 * I, H, dtype), default_config(block, H, I, dtype)


def lora_gemm_configs_tuned(num_tokens: int, E: int, H: int, I: int, dtype: torch.dtype) -> bool:
    """Whether the entry a step of ``num_tokens`` tokens takes has configs
    tuned for GEMMs that add LoRA."""
    table = load_table(config_filename(E, H, I, dtype, device_key()))
    if not table:
        return False
    return "w13_lora" in nearest_entry(table, num_tokens)
