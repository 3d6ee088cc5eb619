"""Experts backends agree with the reference; the oracle filters by LoRA support."""
import pytest
import torch

from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, MoEActivation
from vllm.model_executor.layers.fused_moe.experts.base import ExpertWeights
from vllm.model_executor.layers.fused_moe.experts.grouped_mm import GroupedMMExperts
from vllm.model_executor.layers.fused_moe.experts.torch_ref import TorchReferenceExperts
from vllm.model_executor.layers.fused_moe.layer import expert_placement
from vllm.model_executor.layers.fused_moe.oracle import (MoEBackendError, select_experts_backend,
                                                         unquantized_backends)


def moe_config(**kw):
    base = dict(num_experts=8, num_local_experts=8, top_k=2, hidden_size=32, intermediate_size=16,
                activation=MoEActivation(), has_bias=False, dtype=torch.float32, device="cpu")
    return FusedMoEConfig(**{**base, **kw})


@pytest.mark.parametrize("activation,bias", [(MoEActivation(), False),
                                             (MoEActivation("swigluoai", interleaved=True), True)])
def test_grouped_mm_matches_reference(activation, bias):
    cfg = moe_config(activation=activation, has_bias=bias)
    g = torch.Generator().manual_seed(0)
    E, H, I, T = 8, 32, 16, 13
    w = ExpertWeights(torch.randn(E, 2 * I, H, generator=g) / 6, torch.randn(E, H, I, generator=g) / 4,
                      torch.randn(E, 2 * I, generator=g) if bias else None,
                      torch.randn(E, H, generator=g) if bias else None)
    x = torch.randn(T, H, generator=g)
    weights, ids = torch.rand(T, 8, generator=g).softmax(-1).topk(2)
    ids = ids.to(torch.int32)
    ref, out = torch.full((T, H), float("nan")), torch.full((T, H), float("nan"))
    TorchReferenceExperts(cfg).apply(ref, x, w, weights, ids)
    GroupedMMExperts(cfg).apply(out, x, w, weights, ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # EP: rank 1 of 2 (round robin) only sums its own experts
    local = expert_placement(E, 2, 1, "round_robin")
    emap = torch.full((E,), -1, dtype=torch.int32)
    emap[local] = torch.arange(len(local), dtype=torch.int32)
    wl = ExpertWeights(*(t[local] if t is not None else None
                         for t in (w.w13, w.w2, w.w13_bias, w.w2_bias)))
    cfg_l = moe_config(num_local_experts=len(local), activation=activation, has_bias=bias)
    ep_ref, ep_out = torch.empty(T, H), torch.empty(T, H)
    TorchReferenceExperts(cfg_l).apply(ep_ref, x, wl, weights, ids, expert_map=emap)
    GroupedMMExperts(cfg_l).apply(ep_out, x, wl, weights, ids, expert_map=emap)
    torch.testing.assert_close(ep_out, ep_ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ep_ref, ref)


def test_expert_placement():
    assert expert_placement(10, 3, 0, "linear") == [0, 1, 2, 3]
    assert expert_placement(10, 3, 2, "linear") == [7, 8, 9]
    assert expert_placement(10, 3, 1, "round_robin") == [1, 4, 7]
    everyone = sorted(e for r in range(4) for e in expert_placement(16, 4, r, "round_robin"))
    assert everyone == list(range(16))


def test_oracle_without_lora_prefers_grouped_mm_on_cpu():
    assert select_experts_backend(moe_config(), unquantized_backends(), "auto", False) \
        is GroupedMMExperts


def test_oracle_with_lora_never_picks_a_backend_without_lora():
    chosen = select_experts_backend(moe_config(), unquantized_backends(), "auto", True)
    assert chosen.supports_lora()


def test_explicit_backend_without_lora_support_is_refused():
    with pytest.raises(MoEBackendError, match="grouped_mm cannot run LoRA.*torch"):
        select_experts_backend(moe_config(), unquantized_backends(), "grouped_mm", True)


def test_explicit_backend_that_cannot_run_here():
    with pytest.raises(MoEBackendError, match="triton cannot run.*CUDA"):
        select_experts_backend(moe_config(), unquantized_backends(), "triton", False)
    with pytest.raises(MoEBackendError, match="unknown --moe-backend"):
        select_experts_backend(moe_config(), unquantized_backends(), "magic", False)
