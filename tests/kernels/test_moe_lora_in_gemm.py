"""LoRA computed inside the expert GEMM (``moe_lora_in_gemm``) against the
torch reference of the fused GEMM, and that reference against the base GEMM
followed by the separate torch LoRA ops (Triton's interpreter on CPU;
bfloat16 on a GPU).

Shrink outputs fed to the epilogue are NaN in the rows the separate shrink
does not write (no adapter, adapter off for the layer): the GEMM must not
read them. Rows of pairs in no block must stay NaN."""
import pytest
import torch

from tests.kernels.test_lora_ops import (DTYPES, NAN, TOL, adapter_flags, factors, routing,
                                         token_slots)
from vllm.lora.ops import torch_ops
from vllm.model_executor.layers.fused_moe.moe_align import moe_align_block_size_torch

gemm = pytest.importorskip("vllm.model_executor.layers.fused_moe.kernels.fused_moe_gemm")
in_gemm = pytest.importorskip("vllm.lora.ops.triton_ops.moe_lora_in_gemm")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# T, top_k, experts, slots, rank, N per slice (consecutive), K, fraction of
# pairs on other ranks, block size
CASES = [
    (1, 2, 4, 1, 8, (32,), 48, 0.0, 16),
    (7, 2, 6, 3, 12, (32, 32), 40, 0.2, 16),        # gate/up slices
    (24, 4, 5, 4, 16, (48, 48), 64, 0.1, 32),       # blocks mix 3 slots; BLOCK_N 64 -> 16
    (40, 2, 3, 2, 64, (64,), 33, 0.0, 16),          # rank 64, K not a multiple of the block
]


def make_case(case, dtype, gather_rows, gen):
    T, k, E, L, R, Ns, K, ep_drop, block = case
    topk_weights, topk_ids = routing(T, k, E, ep_drop, gen)
    slots = token_slots(T, L, gen)
    enabled = adapter_flags(slots, L)
    N, S = sum(Ns), len(Ns)
    offsets = [sum(Ns[:i]) for i in range(S)]
    a = torch.randn(T if gather_rows else T * k, K, generator=gen).to(DEVICE, dtype)
    b = (torch.randn(E, N, K, generator=gen) / K**0.5).to(DEVICE, dtype)
    lora_a = factors([(L, E, R, K)] * S, K, dtype, gen)
    lora_b = factors([(L, E, n, R) for n in Ns], R, dtype, gen)
    sorted_ids, expert_ids, total = moe_align_block_size_torch(topk_ids, block, E)
    aligned = dict(sorted_pair_ids=sorted_ids, expert_ids=expert_ids,
                   num_pairs_post_padded=total, top_k=k, gather_rows=gather_rows)
    return (topk_weights, topk_ids, slots, enabled, offsets, a, b, lora_a, lora_b, aligned)


def spread_rows(inter, slots, enabled, top_k, L, dtype):
    """The spread layout of a shrink output [S, T*k, R] (NaN where unwritten):
    each pair's row in its slot's columns, zeros elsewhere and in the rows
    of pairs without an adapter or whose adapter is off."""
    S, P, R = inter.shape
    out = torch.zeros(S, P, in_gemm.fused_width(L, R), dtype=dtype, device=inter.device)
    pair_slots = slots.long().repeat_interleave(top_k)
    for p, slot in enumerate(pair_slots.tolist()):
        if slot >= 0 and enabled[slot]:
            col = slot * in_gemm.rank_block(R)
            out[:, p, col:col + R] = inter[:, p]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-L{c[3]}-R{c[4]}-S{len(c[5])}")
@pytest.mark.parametrize("gather_rows,with_weights", [(True, False), (False, True)])
@pytest.mark.parametrize("shrink_in_gemm,early,per_slot,spread", [(True, True, False, False),
                                                                  (False, True, False, False),
                                                                  (False, False, False, False),
                                                                  (False, False, True, False),
                                                                  (False, True, True, False),
                                                                  (False, False, False, True)])
def test_lora_in_gemm_matches_torch(dtype, case, gather_rows, with_weights, shrink_in_gemm,
                                    early, per_slot, spread):
    T, k = case[0], case[1]
    gen = torch.Generator().manual_seed(T * 13 + case[2])
    (topk_weights, topk_ids, slots, enabled, offsets, a, b, lora_a, lora_b,
     aligned) = make_case(case, dtype, gather_rows, gen)
    S, P, R = len(lora_b), T * k, case[4]
    weights = topk_weights if with_weights else None
    bias = torch.randn(b.shape[0], b.shape[1], generator=gen).to(DEVICE, dtype)

    groups = torch_ops.moe_lora_groups(topk_ids, slots, enabled)
    inter = None
    if not shrink_in_gemm:  # the separate shrink's output, in two parts
        inter = torch.full((2, S, P, R), NAN, device=DEVICE)
        torch_ops.fused_moe_lora_shrink(a, lora_a, groups, k, gather_rows, inter[0])
        half = torch.rand(inter.shape[1:], generator=gen).to(DEVICE)
        inter[1] = inter[0] * half
        inter[0] -= inter[1]
        if spread:
            inter = spread_rows(inter.sum(0), slots, enabled, k, lora_b[0].shape[0], dtype)
    lora = in_gemm.MoELoRAGemmFusion(slots, enabled, lora_b, offsets, k,
                                     lora_a=lora_a if shrink_in_gemm else None, inter=inter,
                                     inter_spread=spread)

    got = torch.full((P, b.shape[1]), NAN, dtype=dtype, device=DEVICE)
    want = got.clone()
    config = dict(BLOCK_SIZE_M=aligned["sorted_pair_ids"].numel() // aligned["expert_ids"].numel(),
                  BLOCK_SIZE_N=64, BLOCK_SIZE_K=16, GROUP_SIZE_M=1, num_warps=4, num_stages=2,
                  lora_early=early, lora_per_slot=per_slot)
    gemm.invoke_fused_moe_gemm(a, b, got, bias=bias, topk_weights=weights, config=config,
                               lora=lora, **aligned)
    gemm.fused_moe_gemm_torch(a, b, want, bias=bias, topk_weights=weights, lora=lora,
                              **aligned)
    routed = (topk_ids.reshape(-1) >= 0).nonzero().squeeze(1)
    assert not want[routed].isnan().any() and want.isnan().sum() == (P - routed.numel()) * \
        b.shape[1]
    torch.testing.assert_close(got, want, equal_nan=True, **TOL[dtype])

    # the fused reference is the base GEMM followed by the separate LoRA ops
    if dtype == torch.float32:
        sep = torch.full_like(got, NAN)
        gemm.fused_moe_gemm_torch(a, b, sep, bias=bias, topk_weights=weights, **aligned)
        base = sep.clone()
        inter_sep = torch.zeros(S, P, R, device=DEVICE)
        torch_ops.fused_moe_lora_shrink(a, lora_a, groups, k, gather_rows, inter_sep)
        torch_ops.fused_moe_lora_expand(inter_sep, lora_b, groups, sep, offsets, weights)
        torch.testing.assert_close(want, sep, equal_nan=True, **TOL[dtype])
        assert groups and not torch.allclose(want[routed], base[routed])  # LoRA did something


needs_pdl = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="programmatic dependent launch needs a Hopper or newer GPU")


@pytest.mark.gpu
@needs_pdl
@pytest.mark.parametrize("early,per_slot", [(True, False), (False, False), (False, True),
                                            (True, True)])
def test_gemm_overlapping_the_shrink_by_pair(early, per_slot):
    """The GEMM launched while the by-pair shrink still runs waits for it:
    the shrink output starts as NaN, a read before the shrink is done shows
    up in the result. A long K makes the shrink outlast the GEMM's start."""
    moe_lora = pytest.importorskip("vllm.lora.ops.triton_ops.fused_moe_lora")
    gen = torch.Generator().manual_seed(5)
    case = (6, 4, 8, 3, 16, (64, 64), 4096, 0.1, 16)
    T, k = case[0], case[1]
    (_, topk_ids, slots, enabled, offsets, a, b, lora_a, lora_b,
     aligned) = make_case(case, torch.bfloat16, True, gen)
    config = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=64, BLOCK_SIZE_K=128, GROUP_SIZE_M=1,
                  num_warps=4, num_stages=3, lora_early=early, lora_per_slot=per_slot)
    shrink = moe_lora.moe_lora_shrink_by_pair_config(a.shape[1])
    for _ in range(3):
        inter = torch.full((shrink["SPLIT_K"], len(lora_a), T * k, case[4]), NAN, device=DEVICE)
        moe_lora.fused_moe_lora_shrink_by_pair(a, lora_a, topk_ids, slots, enabled, True,
                                               inter, shrink)
        lora = in_gemm.MoELoRAGemmFusion(slots, enabled, lora_b, offsets, k, inter=inter,
                                         inter_in_flight=True)
        got = torch.full((T * k, b.shape[1]), NAN, dtype=a.dtype, device=DEVICE)
        gemm.invoke_fused_moe_gemm(a, b, got, config=config, lora=lora, **aligned)
        torch.cuda.synchronize()
        want = torch.full_like(got, NAN)
        gemm.fused_moe_gemm_torch(a, b, want, lora=lora, **aligned)
        torch.testing.assert_close(got, want, equal_nan=True, **TOL[a.dtype])


def test_shrink_in_flight_needs_pdl():
    gen = torch.Generator().manual_seed(0)
    case = (6, 2, 4, 2, 8, (32,), 32, 0.0, 16)
    (_, _, slots, enabled, offsets, a, b, _, lora_b,
     aligned) = make_case(case, torch.float32, True, gen)
    lora = in_gemm.MoELoRAGemmFusion(slots, enabled, lora_b, offsets, 2,
                                     inter=torch.zeros(1, 12, 8, device=DEVICE),
                                     inter_in_flight=True)
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        pytest.skip("this device has programmatic dependent launch")
    with pytest.raises(ValueError, match="programmatic dependent launch"):
        gemm.invoke_fused_moe_gemm(a, b, torch.empty(12, 32, device=DEVICE), lora=lora,
                                   **aligned)


def test_fusion_block_n_keeps_blocks_inside_slices():
    b = [torch.zeros(1, 1, 48, 16), torch.zeros(1, 1, 48, 16)]
    lora = in_gemm.MoELoRAGemmFusion(torch.zeros(1, dtype=torch.int32), torch.ones(1), b,
                                     [0, 48], 1, inter=torch.zeros(2, 1, 16))
    assert in_gemm.fusion_block_n(lora, 128, 96) == 16
    b = [torch.zeros(1, 1, 768, 16)] * 2
    lora.lora_b, lora.slice_offsets = b, [0, 768]
    assert in_gemm.fusion_block_n(lora, 128, 1536) == 128
    lora.lora_b, lora.slice_offsets = [torch.zeros(1, 1, 40, 16)] * 2, [0, 40]
    with pytest.raises(ValueError, match="multiples of 16"):
        in_gemm.fusion_block_n(lora, 64, 80)


def test_lora_in_gemm_argument_checks():
    gen = torch.Generator().manual_seed(0)
    case = (6, 2, 4, 2, 8, (32,), 32, 0.0, 16)
    (_, _, slots, enabled, offsets, a, b, lora_a, lora_b,
     aligned) = make_case(case, torch.float32, True, gen)
    c = torch.empty(12, 32, device=DEVICE)
    both = in_gemm.MoELoRAGemmFusion(slots, enabled, lora_b, offsets, 2, lora_a=lora_a,
                                     inter=torch.zeros(1, 12, 8, device=DEVICE))
    with pytest.raises(ValueError, match="exactly one"):
        gemm.invoke_fused_moe_gemm(a, b, c, lora=both, **aligned)
    wide = in_gemm.MoELoRAGemmFusion(slots, enabled, factors([(8, 4, 32, 64)], 64,
                                                             torch.float32, gen), [0], 2,
                                     lora_a=factors([(8, 4, 64, 32)], 32, torch.float32, gen))
    with pytest.raises(ValueError, match="wider than"):
        gemm.invoke_fused_moe_gemm(a, b, c, lora=wide, **aligned)
    short = in_gemm.MoELoRAGemmFusion(slots[:3], enabled, lora_b, offsets, 2, lora_a=lora_a)
    with pytest.raises(ValueError, match="token slots"):
        gemm.invoke_fused_moe_gemm(a, b, c, lora=short, **aligned)
    # a spread shrink output is [S, T*k, L*R] in the factors' dtype, rows contiguous
    for bad in (torch.zeros(1, 12, 8, device=DEVICE),                       # rank-wide rows
                torch.zeros(1, 12, 64, device=DEVICE)[:, :, ::2],           # strided columns
                torch.zeros(1, 12, 32, device=DEVICE, dtype=torch.float16)):  # dtype
        spread = in_gemm.MoELoRAGemmFusion(slots, enabled, lora_b, offsets, 2, inter=bad,
                                           inter_spread=True)
        with pytest.raises(ValueError, match="spread shrink output"):
            gemm.invoke_fused_moe_gemm(a, b, c, lora=spread, **aligned)


def test_fusion_choice():
    from vllm.lora.ops.triton_ops.moe_lora_configs import fusion_default
    from vllm.lora.punica_wrapper.triton_wrapper import TritonPunicaWrapper
    assert [fusion_default(t, 64, True) for t in (1, 128, 512, 8192)] == ["epilogue"] * 4
    assert [fusion_default(t, 128, True) for t in (1, 128, 512, 8192)] == [
        "off", "off", "epilogue", "epilogue"]
    assert [fusion_default(t, 256, True) for t in (128, 512, 2048)] == ["off", "off", "epilogue"]
    # GEMMs without LoRA configs: the epilogue only where it won with the base configs
    assert [fusion_default(t, 64, False) for t in (1, 256, 512, 8192)] == [
        "epilogue", "epilogue", "off", "off"]
    assert fusion_default(8192, 128, False) == "off"
    with pytest.raises(ValueError, match="unknown MoE LoRA fusion"):
        TritonPunicaWrapper(2, torch.device("cpu"), moe_lora_fusion="fused")


def test_shrinks_by_pair_for_fewer_pairs_at_higher_ranks(monkeypatch):
    from types import SimpleNamespace

    from vllm.lora.punica_wrapper.triton_wrapper import TritonPunicaWrapper
    monkeypatch.setenv("VLLM_MOE_LORA_SHRINK_BY_PAIR_MAX_PAIRS", "256")

    def by_pair(pairs, rank, combine=None):
        ctx = SimpleNamespace(max_rank=rank, w13_shrink_combine=combine, w2_shrink_combine=None)
        return TritonPunicaWrapper._by_pair(ctx, torch.zeros(pairs // 8, 8))
    assert by_pair(256, 8) and by_pair(256, 16) and not by_pair(264, 16)
    assert by_pair(64, 32) and not by_pair(72, 32)
    assert by_pair(16, 64) and not by_pair(24, 64)
    assert not by_pair(8, 16, combine=lambda t: t)  # fully sharded LoRA stays aligned
