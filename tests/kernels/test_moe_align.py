"""Triton block alignment against the torch reference: bit for bit."""
import pytest
import torch

from vllm.model_executor.layers.fused_moe.moe_align import (moe_align_block_size,
                                                           moe_align_block_size_torch,
                                                           moe_lora_align_block_size,
                                                           moe_lora_align_block_size_torch)

triton_align = pytest.importorskip(
    "vllm.model_executor.layers.fused_moe.kernels.moe_align_triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_topk_ids(T: int, k: int, E: int, gen: torch.Generator) -> torch.Tensor:
    """Ids from a random subset of the experts (so some are empty), with
    about a fifth of the pairs on other ranks (-1), as EP produces."""
    used = torch.randperm(E, generator=gen)[:max(1, E // 2 + 1)]
    ids = used[torch.randint(0, used.numel(), (T, k), generator=gen)]
    ids[torch.rand(T, k, generator=gen) < 0.2] = -1
    return ids.to(torch.int32).to(DEVICE)


def assert_identical(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w), (g, w)


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("E", [1, 4, 16, 33])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("T", [1, 3, 17, 64])
def test_align_matches_torch(T, k, E, block_size):
    gen = torch.Generator().manual_seed(hash((T, k, E, block_size)) % 2**31)
    ids = random_topk_ids(T, k, E, gen)
    assert_identical(triton_align.moe_align_block_size_triton(ids, block_size, E),
                     moe_align_block_size_torch(ids, block_size, E))


@pytest.mark.parametrize("max_loras", [1, 3, 8])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("E,k", [(1, 1), (4, 2), (33, 4)])
@pytest.mark.parametrize("T", [1, 17, 64])
def test_lora_align_matches_torch(T, E, k, block_size, max_loras):
    gen = torch.Generator().manual_seed(hash((T, k, E, block_size, max_loras)) % 2**31)
    ids = random_topk_ids(T, k, E, gen)
    # slot -1 = no adapter; the top slot is never used, so one slot is empty
    slots = torch.randint(-1, max(max_loras - 1, 1), (T,), generator=gen).to(DEVICE)
    assert_identical(
        triton_align.moe_lora_align_block_size_triton(ids, slots, block_size, E, max_loras),
        moe_lora_align_block_size_torch(ids, slots, block_size, E, max_loras))


def test_int64_ids_and_no_tokens():
    gen = torch.Generator().manual_seed(0)
    ids = random_topk_ids(9, 2, 8, gen).long()
    assert_identical(triton_align.moe_align_block_size_triton(ids, 16, 8),
                     moe_align_block_size_torch(ids, 16, 8))
    empty = torch.empty(0, 2, dtype=torch.int32, device=DEVICE)
    assert_identical(triton_align.moe_align_block_size_triton(empty, 16, 8),
                     moe_align_block_size_torch(empty, 16, 8))


@pytest.mark.parametrize("impl", ["auto", "torch", "triton"])
def test_dispatch_honours_env(monkeypatch, impl):
    monkeypatch.setenv("VLLM_MOE_OPS_IMPL", impl)
    calls = []
    real = triton_align.moe_align_block_size_triton
    monkeypatch.setattr(triton_align, "moe_align_block_size_triton",
                        lambda *a: calls.append(a) or real(*a))
    real_lora = triton_align.moe_lora_align_block_size_triton
    monkeypatch.setattr(triton_align, "moe_lora_align_block_size_triton",
                        lambda *a: calls.append(a) or real_lora(*a))
    gen = torch.Generator().manual_seed(1)
    ids = random_topk_ids(5, 2, 4, gen)
    slots = torch.tensor([0, -1, 1, 1, 0], device=DEVICE)
    assert_identical(moe_align_block_size(ids, 16, 4), moe_align_block_size_torch(ids, 16, 4))
    assert_identical(moe_lora_align_block_size(ids, slots, 16, 4, 2),
                     moe_lora_align_block_size_torch(ids, slots, 16, 4, 2))
    uses_triton = impl == "triton" or (impl == "auto" and ids.is_cuda)
    assert len(calls) == (2 if uses_triton else 0)


def test_dispatch_rejects_unknown_impl(monkeypatch):
    monkeypatch.setenv("VLLM_MOE_OPS_IMPL", "cutlass")
    with pytest.raises(ValueError, match="VLLM_MOE_OPS_IMPL"):
        moe_align_block_size(torch.zeros(2, 1, dtype=torch.int32), 16, 2)
