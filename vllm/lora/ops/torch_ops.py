"""Reference LoRA ops in plain torch: the CPU path and the oracle for the
Triton kernels in ``triton_ops``.

Conventions shared with the kernels:
- adapter factors are stacked per slot: ``lora_a[s]`` is ``[L, R, K]``
  (linear) or ``[L, E, R, K]`` (MoE), ``lora_b[s]`` is ``[L, N_s, R]`` or
  ``[L, E, N_s, R]`` for slice ``s`` of the output; the scaling is folded
  into B; ranks below R are zero-padded;
- shrink writes ``x @ A.T`` into a float32 buffer ``[S, rows, R]``; expand
  adds ``buffer @ B.T`` into the slice's columns of the output;
- rows without an adapter (slot -1), of a slot whose adapter does not touch
  the layer (``adapter_enabled[slot] == 0``) or routed to an expert of
  another rank (id -1) are left untouched.
"""
from __future__ import annotations

import torch

from vllm.lora.token_mapping import LoRATokenMapping


def _slot_runs(mapping: LoRATokenMapping) -> list[tuple[int, torch.Tensor]]:
    starts = mapping.slot_start.tolist()
    return [(s, mapping.sorted_token_ids[starts[s]:starts[s + 1]].long())
            for s in range(mapping.max_loras) if starts[s + 1] > starts[s]]


def lora_shrink(x: torch.Tensor, lora_a: list[torch.Tensor], mapping: LoRATokenMapping,
                out: torch.Tensor) -> None:
    """out[s, t] = x[t] @ lora_a[s][slot(t)].T   (x [T, K], out [S, T, R] fp32)."""
    for slot, tokens in _slot_runs(mapping):
        xs = x[tokens].float()
        for s, a in enumerate(lora_a):
            out[s, tokens] = xs @ a[slot].float().T


def lora_expand(inter: torch.Tensor, lora_b: list[torch.Tensor], mapping: LoRATokenMapping,
                y: torch.Tensor, slice_offsets: list[int]) -> None:
    """y[t, off_s : off_s + N_s] += inter[s, t] @ lora_b[s][slot(t)].T"""
    for slot, tokens in _slot_runs(mapping):
        for s, b in enumerate(lora_b):
            n = b.shape[1]
            delta = inter[s, tokens] @ b[slot].float().T
            y[tokens, slice_offsets[s]:slice_offsets[s] + n] += delta.to(y.dtype)


def moe_lora_groups(topk_ids: torch.Tensor, token_lora_slot: torch.Tensor,
                    adapter_enabled: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
    """(slot, local expert, pair rows) for every group of (token, expert)
    pairs that runs an enabled adapter on an expert of this rank."""
    k = topk_ids.shape[1]
    experts = topk_ids.reshape(-1).long()
    slots = token_lora_slot.long().repeat_interleave(k)
    enabled = adapter_enabled.bool()
    valid = (experts >= 0) & (slots >= 0)
    valid &= enabled[slots.clamp(min=0)]
    rows = torch.nonzero(valid).squeeze(1)
    if rows.numel() == 0:
        return []
    num_experts = int(experts.max()) + 1
    keys = slots[rows] * num_experts + experts[rows]
    groups = []
    for key in torch.unique(keys).tolist():
        groups.append((key // num_experts, key % num_experts, rows[keys == key]))
    return groups


def fused_moe_lora_shrink(x: torch.Tensor, lora_a: list[torch.Tensor],
                          groups: list[tuple[int, int, torch.Tensor]], top_k: int,
                          gather_rows: bool, out: torch.Tensor) -> None:
    """out[s, pair] = x[row(pair)] @ lora_a[s][slot, expert].T, with
    row(pair) = pair // top_k when ``gather_rows`` (x is per token) else pair."""
    for slot, expert, pairs in groups:
        xs = x[pairs // top_k if gather_rows else pairs].float()
        for s, a in enumerate(lora_a):
            out[s, pairs] = xs @ a[slot, expert].float().T


def fused_moe_lora_expand(inter: torch.Tensor, lora_b: list[torch.Tensor],
                          groups: list[tuple[int, int, torch.Tensor]], y: torch.Tensor,
                          slice_offsets: list[int],
                          topk_weights: torch.Tensor | None = None) -> None:
    """y[pair, off_s : off_s + N_s] += (inter[s, pair] @ lora_b[s][slot, expert].T)
    (times the pair's routing weight when ``topk_weights`` is given)."""
    weights = None if topk_weights is None else topk_weights.reshape(-1).float()
    for slot, expert, pairs in groups:
        for s, b in enumerate(lora_b):
            n = b.shape[2]
            delta = inter[s, pairs] @ b[slot, expert].float().T
            if weights is not None:
                delta = delta * weights[pairs].unsqueeze(1)
            y[pairs, slice_offsets[s]:slice_offsets[s] + n] += delta.to(y.dtype)
