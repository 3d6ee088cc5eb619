"""Block alignment of routed tokens for the grouped expert GEMMs.

``moe_align_block_size`` sorts the T*k (token, expert) pairs by expert and
pads each expert's run to a multiple of ``block_size``, so that every block
of ``block_size`` rows of a GEMM belongs to one expert. The LoRA variant
does the same separately for each adapter slot, over the pairs whose token
runs with that slot.

Exact output contract (the Triton and native versions reproduce it bit for
bit): pair index ``i = t * k + j``; experts in increasing order; within an
expert, pairs in increasing ``i``; padding and the unused tail hold the
sentinel ``T * k``; ``expert_ids`` has one entry per block, -1 for unused
blocks; pairs with expert id -1 (experts on another rank) are dropped.
Buffers have static sizes (``max_padded_pairs``) so CUDA graphs can capture.
"""
from __future__ import annotations

import torch

from vllm import envs
from vllm.triton_utils import has_triton


def max_padded_pairs(num_pairs: int, num_experts: int, block_size: int) -> int:
    padded = num_pairs + num_experts * (block_size - 1)
    return -(-padded // block_size) * block_size


def moe_align_block_size_torch(topk_ids: torch.Tensor, block_size: int, num_experts: int,
                               pair_mask: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (sorted_pair_ids [P] int32, expert_ids [P // block_size] int32,
    num_pairs_post_padded [1] int32), P = max_padded_pairs(T*k, E, block_size).

    ``pair_mask`` [T*k] bool keeps only some pairs (the LoRA variant)."""
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    device = topk_ids.device
    P = max_padded_pairs(num_pairs, num_experts, block_size)
    sorted_ids = torch.full((P,), num_pairs, dtype=torch.int32, device=device)
    expert_ids = torch.full((P // block_size,), -1, dtype=torch.int32, device=device)
    keep = flat >= 0
    if pair_mask is not None:
        keep &= pair_mask
    pairs = torch.nonzero(keep).squeeze(1)
    experts = flat[pairs]
    # stable sort by expert keeps pairs in increasing index within an expert
    order = torch.sort(experts, stable=True).indices
    pairs, experts = pairs[order], experts[order]
    counts = torch.bincount(experts, minlength=num_experts)
    padded = (counts + block_size - 1) // block_size * block_size
    starts = torch.cumsum(padded, 0) - padded
    run_starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(pairs.numel(), device=device) - run_starts[experts]
    sorted_ids[starts[experts] + rank_in_expert] = pairs.to(torch.int32)
    blocks_per_expert = padded // block_size
    expert_ids[:int(blocks_per_expert.sum())] = torch.repeat_interleave(
        torch.arange(num_experts, device=device, dtype=torch.int32), blocks_per_expert)
    total = padded.sum().to(torch.int32).reshape(1)
    return sorted_ids, expert_ids, total


def one_token_alignment(top_k: int, block_size: int, device: torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pair_ids [top_k * block_size] int32, num_pairs_post_padded [1]
    int32) of an alignment of ONE token's pairs that needs no kernel: the
    token's top_k experts are distinct, so block j can hold pair j alone,
    and ``topk_ids.reshape(-1)`` is its ``expert_ids``. Unlike
    ``moe_align_block_size``'s, its blocks are in pair order (the GEMMs do
    not mind) and an expert of another rank keeps its block (id -1, which
    the GEMMs skip). The same for every step: build it once."""
    sorted_ids = torch.full((top_k, block_size), top_k, dtype=torch.int32, device=device)
    sorted_ids[:, 0] = torch.arange(top_k, dtype=torch.int32, device=device)
    total = torch.tensor([top_k * block_size], dtype=torch.int32, device=device)
    return sorted_ids.reshape(-1), total


def moe_lora_align_block_size_torch(topk_ids: torch.Tensor, token_lora_slot: torch.Tensor,
                                    block_size: int, num_experts: int, max_loras: int
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per adapter slot s, the alignment of the pairs whose token has slot s.
    -> (sorted_pair_ids [L, P], expert_ids [L, P // block_size],
    num_pairs_post_padded [L]); tokens with slot -1 (no adapter) appear nowhere."""
    k = topk_ids.shape[1]
    pair_slot = token_lora_slot.long().repeat_interleave(k)
    results = [moe_align_block_size_torch(topk_ids, block_size, num_experts, pair_slot == s)
               for s in range(max_loras)]
    return (torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results]),
            torch.cat([r[2] for r in results]))


def _implementation(device: torch.device, num_experts: int) -> str:
    """native, triton or torch, per ``VLLM_MOE_OPS_IMPL``. ``auto`` picks the
    native library where it is built (on the H100 it beats Triton at every
    decode size, on the CPU it beats torch; benchmarks/RESULTS.md), else
    Triton on CUDA, else torch."""
    impl = envs.VLLM_MOE_OPS_IMPL
    if impl not in ("auto", "native", "triton", "torch"):
        raise ValueError(f"unknown VLLM_MOE_OPS_IMPL {impl!r}; choose from auto, native, "
                         "triton, torch")
    from vllm import native
    if impl == "native":
        if not native.available(device, num_experts):
            raise RuntimeError(f"VLLM_MOE_OPS_IMPL=native but the native ops are not built "
                               f"for {device.type} or cannot align {num_experts} experts")
        return "native"
    if impl == "triton":
        if not has_triton():
            raise RuntimeError("VLLM_MOE_OPS_IMPL=triton but triton is not installed")
        return "triton"
    if impl == "torch":
        return "torch"
    if native.available(device, num_experts):
        return "native"
    return "triton" if device.type == "cuda" and has_triton() else "torch"


def moe_align_block_size(topk_ids: torch.Tensor, block_size: int, num_experts: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``moe_align_block_size_torch`` through the implementation chosen here."""
    impl = _implementation(topk_ids.device, num_experts)
    if impl == "native":
        from vllm import native
        return native.moe_align(topk_ids, block_size, num_experts)
    if impl == "triton":
        from vllm.model_executor.layers.fused_moe.kernels.moe_align_triton import (
            moe_align_block_size_triton)
        return moe_align_block_size_triton(topk_ids, block_size, num_experts)
    return moe_align_block_size_torch(topk_ids, block_size, num_experts)


def moe_lora_align_block_size(topk_ids: torch.Tensor, token_lora_slot: torch.Tensor,
                              block_size: int, num_experts: int, max_loras: int
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``moe_lora_align_block_size_torch`` through the implementation chosen here."""
    impl = _implementation(topk_ids.device, num_experts)
    if impl == "native":
        from vllm import native
        return native.moe_align(topk_ids, block_size, num_experts, token_lora_slot, max_loras)
    if impl == "triton":
        from vllm.model_executor.layers.fused_moe.kernels.moe_align_triton import (
            moe_lora_align_block_size_triton)
        return moe_lora_align_block_size_triton(topk_ids, token_lora_slot, block_size,
                                                num_experts, max_loras)
    return moe_lora_align_block_size_torch(topk_ids, token_lora_slot, block_size, num_experts,
                                           max_loras)
