"""Triton grouped expert GEMM and TritonExperts against their torch
references (Triton's interpreter on CPU; bfloat16 on a GPU)."""
from dataclasses import replace

import pytest
import torch

from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, MoEActivation
from vllm.model_executor.layers.fused_moe.experts.base import ExpertWeights
from vllm.model_executor.layers.fused_moe.experts.torch_ref import TorchReferenceExperts
from vllm.model_executor.layers.fused_moe.experts.triton import TritonExperts
from vllm.model_executor.layers.fused_moe.moe_align import moe_align_block_size_torch

gemm = pytest.importorskip("vllm.model_executor.layers.fused_moe.kernels.fused_moe_gemm")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def routing(T: int, k: int, E: int, gen: torch.Generator, device: str = DEVICE):
    """Distinct experts per token, softmax-like positive weights."""
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(torch.int32)
    weights = torch.rand(T, k, generator=gen) + 0.1
    weights /= weights.sum(1, keepdim=True)
    return weights.to(device), ids.to(device)


BF16_ON_GPU = pytest.param(torch.bfloat16, marks=pytest.mark.gpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16_ON_GPU])
@pytest.mark.parametrize("gather_rows", [True, False])
@pytest.mark.parametrize("with_bias,with_weights", [(False, False), (True, True)])
def test_gemm_matches_torch(dtype, gather_rows, with_bias, with_weights):
    gen = torch.Generator().manual_seed(7)
    T, k, E, N, K, block = 13, 2, 5, 48, 40, 16
    topk_weights, topk_ids = routing(T, k, E, gen)
    sorted_ids, expert_ids, total = moe_align_block_size_torch(topk_ids, block, E)
    # a skipped block: its pairs must stay untouched
    expert_ids[1] = -1
    a = torch.randn(T if gather_rows else T * k, K, generator=gen).to(DEVICE, dtype)
    b = (torch.randn(E, N, K, generator=gen) / K**0.5).to(DEVICE, dtype)
    bias = torch.randn(E, N, generator=gen).to(DEVICE, dtype) if with_bias else None
    args = dict(sorted_pair_ids=sorted_ids, expert_ids=expert_ids, num_pairs_post_padded=total,
                top_k=k, gather_rows=gather_rows, bias=bias,
                topk_weights=topk_weights if with_weights else None)
    got = torch.full((T * k, N), float("nan"), dtype=dtype, device=DEVICE)
    want = got.clone()
    gemm.invoke_fused_moe_gemm(a, b, got, **args)
    gemm.fused_moe_gemm_torch(a, b, want, **args)
    skipped = sorted_ids[block:2 * block]
    skipped = skipped[skipped < T * k].long()
    assert skipped.numel() > 0 and want[skipped].isnan().all()
    assert want.isnan().sum() == skipped.numel() * N
    torch.testing.assert_close(got, want, equal_nan=True, **TOL[dtype])


def test_gemm_strided_operands_and_explicit_config():
    gen = torch.Generator().manual_seed(3)
    T, k, E, N, K = 6, 2, 3, 32, 24
    topk_weights, topk_ids = routing(T, k, E, gen)
    sorted_ids, expert_ids, total = moe_align_block_size_torch(topk_ids, 32, E)
    a = torch.randn(K, T, generator=gen).to(DEVICE).t()           # column-major
    b = torch.randn(E, K, N, generator=gen).to(DEVICE).transpose(1, 2)
    c_full = torch.full((T * k, 2 * N), float("nan"), device=DEVICE)
    got = c_full[:, ::2]                                          # column stride 2
    want = got.clone()
    config = dict(BLOCK_SIZE_M=32, BLOCK_SIZE_N=16, BLOCK_SIZE_K=16, GROUP_SIZE_M=2,
                  num_warps=4, num_stages=2)
    args = dict(sorted_pair_ids=sorted_ids, expert_ids=expert_ids, num_pairs_post_padded=total,
                top_k=k, gather_rows=True, topk_weights=topk_weights)
    gemm.invoke_fused_moe_gemm(a, b, got, config=config, **args)
    gemm.fused_moe_gemm_torch(a, b, want, **args)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert c_full[:, 1::2].isnan().all()
    with pytest.raises(ValueError, match="BLOCK_SIZE_M"):
        gemm.invoke_fused_moe_gemm(a, b, got, config=dict(config, BLOCK_SIZE_M=16), **args)


CASES = {
    "silu": (MoEActivation("silu"), False, None),
    "swigluoai_interleaved_bias": (MoEActivation("swigluoai", interleaved=True), True, None),
    # EP rank 1 of 2 (round robin): global experts 1, 3, 5, 7 live here
    "silu_ep": (MoEActivation("silu"), False, 2),
}


def run_both(case: str, dtype: torch.dtype, T: int, H: int, I: int, E: int, k: int,
             device: str, seed: int):
    activation, has_bias, ep_size = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    E_local = E // ep_size if ep_size else E
    moe = FusedMoEConfig(num_experts=E, num_local_experts=E_local, top_k=k, hidden_size=H,
                         intermediate_size=I, activation=activation, has_bias=has_bias,
                         dtype=dtype, device=device, ep_rank=1 if ep_size else 0,
                         ep_size=ep_size or 1)
    expert_map = None
    if ep_size:
        expert_map = torch.full((E,), -1, dtype=torch.int32)
        expert_map[1::2] = torch.arange(E_local, dtype=torch.int32)
        expert_map = expert_map.to(device)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    weights = ExpertWeights(w13=rand(E_local, 2 * I, H, scale=H**-0.5),
                            w2=rand(E_local, H, I, scale=I**-0.5),
                            w13_bias=rand(E_local, 2 * I) if has_bias else None,
                            w2_bias=rand(E_local, H) if has_bias else None)
    x = rand(T, H)
    topk_weights, topk_ids = routing(T, k, E, gen, device)
    outs = []
    for cls in (TritonExperts, TorchReferenceExperts):
        out = torch.full((T, H), float("nan"), dtype=dtype, device=device)
        cls(moe).apply(out, x, weights, topk_weights, topk_ids, expert_map=expert_map)
        outs.append(out)
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16_ON_GPU])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("T", [1, 11])  # one token: no alignment kernel
def test_triton_experts_match_reference(monkeypatch, case, dtype, T):
    # the Triton alignment too, not only the GEMMs
    monkeypatch.setenv("VLLM_MOE_OPS_IMPL", "triton")
    got, want = run_both(case, dtype, T=T, H=32, I=48, E=8, k=2, device=DEVICE, seed=11)
    assert not want.isnan().any()
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_one_token_alignment_is_built_once_and_holds_every_pair():
    moe = FusedMoEConfig(num_experts=8, num_local_experts=8, top_k=3, hidden_size=32,
                         intermediate_size=32, activation=MoEActivation(), has_bias=False,
                         dtype=torch.float32, device=DEVICE)
    experts = TritonExperts(moe)
    ids = torch.tensor([[5, 0, 2]], dtype=torch.int32, device=DEVICE)
    first = experts.align(ids)
    block = first["sorted_pair_ids"].numel() // 3
    assert first["expert_ids"].tolist() == [5, 0, 2]
    assert first["num_pairs_post_padded"].tolist() == [3 * block]
    rows = first["sorted_pair_ids"].reshape(3, block)
    assert rows[:, 0].tolist() == [0, 1, 2] and (rows[:, 1:] == 3).all()
    again = experts.align(torch.tensor([[1, 7, 4]], dtype=torch.int32, device=DEVICE))
    assert again["sorted_pair_ids"] is first["sorted_pair_ids"]
    assert again["expert_ids"].tolist() == [1, 7, 4]
    # more tokens take the sorting alignment
    two = experts.align(torch.tensor([[1, 7, 4], [7, 1, 0]], dtype=torch.int32, device=DEVICE))
    assert two["expert_ids"][:4].tolist() == [0, 1, 4, 7]


def test_unsupported_reason():
    moe = FusedMoEConfig(num_experts=4, num_local_experts=4, top_k=2, hidden_size=32,
                         intermediate_size=32, activation=MoEActivation(), has_bias=False,
                         dtype=torch.float16, device="cpu")
    assert TritonExperts.supports_lora()
    assert TritonExperts.unsupported_reason(moe) is not None
    cuda = replace(moe, device="cuda")
    assert TritonExperts.unsupported_reason(cuda) is None
    assert TritonExperts.unsupported_reason(replace(cuda, quant_scheme="fp8")) is not None


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 33, 300])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_experts_bf16_cuda(case, T):
    got, want = run_both(case, torch.bfloat16, T=T, H=256, I=128, E=16, k=4, device="cuda",
                         seed=T)
    assert not want.isnan().any()
    torch.testing.assert_close(got, want, **TOL[torch.bfloat16])
