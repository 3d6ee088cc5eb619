"""Triton LoRA kernels (dense and MoE shrink/expand) against the torch
reference ops (Triton's interpreter on CPU; bfloat16 on a GPU).

Outputs are poisoned: shrink buffers start as NaN, so every row the op must
write has to come out finite and every row it must leave alone stays NaN;
``y`` starts with random values that untouched rows and columns must keep
bit for bit. The shrink results fed to expand keep NaN in the rows of tokens
without an adapter, so expand must not read them.
"""
import pytest
import torch

from vllm.lora.ops import torch_ops
from vllm.lora.token_mapping import LoRATokenMapping
from vllm.model_executor.layers.fused_moe.moe_align import moe_lora_align_block_size

lora_ops = pytest.importorskip("vllm.lora.ops.triton_ops.lora_ops")
moe_lora = pytest.importorskip("vllm.lora.ops.triton_ops.fused_moe_lora")
fused_width = moe_lora.fused_width
rank_block = lora_ops.rank_block

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
NAN = float("nan")


def token_slots(T: int, max_loras: int, gen: torch.Generator) -> torch.Tensor:
    """Random slots; the last token has an adapter, the first (when there are
    more than two) has none, and with more than one slot, slot 1 is unused."""
    slots = torch.randint(-1, max_loras, (T,), generator=gen, dtype=torch.int32)
    if max_loras > 1:
        slots[slots == 1] = -1
    slots[-1] = max_loras - 1 if max_loras != 2 else 0
    if T > 2:
        slots[0] = -1
    return slots.to(DEVICE)


def adapter_flags(slots: torch.Tensor, max_loras: int,
                  dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Every slot's adapter touches the layer but, when tokens use more than
    one slot, the first used one: its tokens must get no delta."""
    enabled = torch.ones(max_loras, dtype=torch.int32)
    used = sorted(set(slots.tolist()) - {-1})
    if len(used) > 1:
        enabled[used[0]] = 0
    return enabled.to(DEVICE, dtype)


def factors(shapes: list[tuple[int, ...]], fan_in: int, dtype: torch.dtype,
            gen: torch.Generator) -> list[torch.Tensor]:
    return [(torch.randn(*s, generator=gen) / fan_in**0.5).to(DEVICE, dtype) for s in shapes]


def slice_layout(Ns: tuple[int, ...]) -> tuple[list[int], int]:
    """Slice offsets with a 3-column gap after every slice (gaps must stay
    untouched) and the total width."""
    offsets, width = [], 0
    for n in Ns:
        offsets.append(width)
        width += n + 3
    return offsets, width


def strided_y(rows: int, width: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A non-contiguous view (row stride > width) of random values."""
    return torch.randn(rows, width + 5, generator=gen).to(DEVICE, dtype)[:, :width]


def assert_untouched(got: torch.Tensor, before: torch.Tensor, rows: torch.Tensor,
                     offsets: list[int], Ns: tuple[int, ...]) -> None:
    """Rows outside ``rows`` and columns outside every slice equal ``before``."""
    keep_rows = torch.ones(got.shape[0], dtype=torch.bool, device=got.device)
    keep_rows[rows] = False
    assert torch.equal(got[keep_rows], before[keep_rows])
    keep_cols = torch.ones(got.shape[1], dtype=torch.bool, device=got.device)
    for off, n in zip(offsets, Ns):
        keep_cols[off:off + n] = False
    assert torch.equal(got[:, keep_cols], before[:, keep_cols])


def check_shrink_out(got: torch.Tensor, want: torch.Tensor, written: torch.Tensor,
                     dtype: torch.dtype) -> None:
    """``got``: [S, rows, R], or [SPLIT_K, S, rows, R] parts adding up to it."""
    parts = got if got.dim() == 4 else got.unsqueeze(0)
    assert not parts[:, :, written].isnan().any()
    untouched = torch.ones(parts.shape[2], dtype=torch.bool, device=got.device)
    untouched[written] = False
    assert parts[:, :, untouched].isnan().all()
    torch.testing.assert_close(parts.sum(0), want, equal_nan=True, **TOL[dtype])


# T, max_loras, rank, N per slice, K
LINEAR_CASES = [
    (1, 1, 8, (32,), 48),
    (9, 3, 12, (40, 24), 64),
    (37, 8, 16, (96, 32, 32), 80),
    (20, 5, 32, (48, 16, 80), 33),
    (50, 2, 64, (64,), 96),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"T{c[0]}-L{c[1]}-r{c[2]}")
def test_lora_shrink_expand(dtype, case):
    T, L, R, Ns, K = case
    gen = torch.Generator().manual_seed(T * 131 + R)
    mapping = LoRATokenMapping.build(token_slots(T, L, gen), L)
    written = torch.nonzero(mapping.token_lora_slot >= 0).squeeze(1)
    S = len(Ns)
    x = torch.randn(T, K, generator=gen).to(DEVICE, dtype)
    lora_a = factors([(L, R, K)] * S, K, dtype, gen)
    lora_b = factors([(L, n, R) for n in Ns], R, dtype, gen)

    want = torch.full((S, T, R), NAN, device=DEVICE)
    torch_ops.lora_shrink(x, lora_a, mapping, want)
    # the default config with one part, and K split over 3 programs with a
    # ragged last split into 3 parts
    split = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_K=16, SPLIT_K=3, num_warps=4, num_stages=2)
    outs = []
    for config, parts in ((None, 1), (split, 3)):
        got = torch.full((parts, S, T, R), NAN, device=DEVICE)
        lora_ops.lora_shrink(x, lora_a, mapping, got if parts > 1 else got[0], config=config)
        check_shrink_out(got, want, written, dtype)
        outs.append(got)

    offsets, width = slice_layout(Ns)
    y0 = strided_y(T, width, dtype, gen)
    y_want = y0.clone()
    torch_ops.lora_expand(want, lora_b, mapping, y_want, offsets)
    for inter in (want, *outs):  # expand adds up the parts
        y = y0.clone()
        lora_ops.lora_expand(inter, lora_b, mapping, y, offsets)
        torch.testing.assert_close(y, y_want, **TOL[dtype])
        assert_untouched(y, y0, written, offsets, Ns)


def test_lora_ops_without_adapters_touch_nothing():
    gen = torch.Generator().manual_seed(0)
    T, L, R, K, N = 5, 3, 16, 32, 32
    mapping = LoRATokenMapping.build(torch.full((T,), -1, dtype=torch.int32, device=DEVICE), L)
    x = torch.randn(T, K, generator=gen).to(DEVICE)
    out = torch.full((1, T, R), NAN, device=DEVICE)
    lora_ops.lora_shrink(x, factors([(L, R, K)], K, torch.float32, gen), mapping, out)
    assert out.isnan().all()
    y = torch.randn(T, N, generator=gen).to(DEVICE)
    before = y.clone()
    lora_ops.lora_expand(torch.randn(1, T, R, generator=gen).to(DEVICE),
                         factors([(L, N, R)], R, torch.float32, gen), mapping, y, [0])
    assert torch.equal(y, before)


def routing(T: int, k: int, E: int, ep_drop: float, gen: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token; a fraction ``ep_drop`` of the pairs goes to
    experts of another rank (-1)."""
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(torch.int32)
    ids[torch.rand(T, k, generator=gen) < ep_drop] = -1
    weights = torch.rand(T, k, generator=gen) + 0.1
    return weights.to(DEVICE), ids.to(DEVICE)


# T, top_k, experts, max_loras, rank, N per slice, K, fraction of pairs on
# other ranks, block size (None: moe_lora_block_size)
MOE_CASES = [
    (1, 1, 4, 1, 8, (32,), 48, 0.0, None),
    (5, 2, 8, 3, 12, (40, 24), 64, 0.2, None),
    (12, 4, 6, 8, 16, (48, 48), 40, 0.25, None),
    (9, 2, 16, 4, 32, (96,), 72, 0.0, None),
    (16, 4, 8, 2, 64, (16, 80, 32), 33, 0.3, 32),
    # (slot, expert) groups longer than one block
    (80, 2, 2, 2, 16, (24, 24), 32, 0.05, 16),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MOE_CASES, ids=lambda c: f"T{c[0]}-k{c[1]}-E{c[2]}-L{c[3]}")
@pytest.mark.parametrize("gather_rows,with_weights", [(True, False), (False, True)])
def test_fused_moe_lora_shrink_expand(dtype, case, gather_rows, with_weights):
    T, k, E, L, R, Ns, K, ep_drop, block = case
    gen = torch.Generator().manual_seed(T * 31 + E)
    topk_weights, topk_ids = routing(T, k, E, ep_drop, gen)
    slots = token_slots(T, L, gen)
    # both dtypes a caller may keep the flags in
    enabled = adapter_flags(slots, L, torch.bool if with_weights else torch.int32)
    block = block or moe_lora.moe_lora_block_size(T * k, E, L)
    sorted_ids, expert_ids, npp = moe_lora_align_block_size(topk_ids, slots, block, E, L)
    groups = torch_ops.moe_lora_groups(topk_ids, slots, enabled)
    assert groups
    written = torch.cat([g[2] for g in groups])

    S, P = len(Ns), T * k
    x = torch.randn(T if gather_rows else P, K, generator=gen).to(DEVICE, dtype)
    lora_a = factors([(L, E, R, K)] * S, K, dtype, gen)
    lora_b = factors([(L, E, n, R) for n in Ns], R, dtype, gen)
    align = (sorted_ids, expert_ids, npp, enabled)

    want = torch.full((S, P, R), NAN, device=DEVICE)
    torch_ops.fused_moe_lora_shrink(x, lora_a, groups, k, gather_rows, want)
    split = dict(BLOCK_SIZE_K=16, SPLIT_K=2, num_warps=4, num_stages=2)
    outs = []
    for config, parts in ((None, 1), (split, 2)):
        got = torch.full((parts, S, P, R), NAN, device=DEVICE)
        moe_lora.fused_moe_lora_shrink(x, lora_a, *align, k, gather_rows,
                                       got if parts > 1 else got[0], block, config=config)
        check_shrink_out(got, want, written, dtype)
        outs.append(got)
    # the spread layout the expert GEMMs' LoRA K steps read: a pair's row in
    # its slot's columns, everything else left at zero
    col = slots.long().repeat_interleave(k)[written] * rank_block(R)
    want_spread = torch.zeros(S, P, fused_width(L, R), device=DEVICE)
    for p, c in zip(written.tolist(), col.tolist()):
        want_spread[:, p, c:c + R] = want[:, p]
    got = torch.zeros(S, P, fused_width(L, R), dtype=dtype, device=DEVICE)
    moe_lora.fused_moe_lora_shrink(x, lora_a, *align, k, gather_rows, got, block, spread=True)
    torch.testing.assert_close(got.float(), want_spread, **TOL[dtype])
    with pytest.raises(ValueError, match="no split K"):  # one writer per element
        moe_lora.fused_moe_lora_shrink(x, lora_a, *align, k, gather_rows, got, block,
                                       config=split, spread=True)
    with pytest.raises(ValueError, match="spread shrink output"):
        moe_lora.fused_moe_lora_shrink(x, lora_a, *align, k, gather_rows, got[..., :R], block,
                                       spread=True)

    offsets, width = slice_layout(Ns)
    weights = topk_weights if with_weights else None
    y0 = strided_y(P, width, dtype, gen)
    y_want = y0.clone()
    torch_ops.fused_moe_lora_expand(want, lora_b, groups, y_want, offsets, weights)
    for inter in (want, *outs):  # expand adds up the parts
        y = y0.clone()
        moe_lora.fused_moe_lora_expand(inter, lora_b, *align, y, offsets, topk_weights=weights)
        torch.testing.assert_close(y, y_want, **TOL[dtype])
        assert_untouched(y, y0, written, offsets, Ns)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MOE_CASES, ids=lambda c: f"T{c[0]}-k{c[1]}-E{c[2]}-L{c[3]}")
@pytest.mark.parametrize("gather_rows", [True, False])
def test_fused_moe_lora_shrink_by_pair(dtype, case, gather_rows):
    """The shrink without an alignment writes what the aligned one writes."""
    T, k, E, L, R, Ns, K, ep_drop, _ = case
    gen = torch.Generator().manual_seed(T * 17 + E)
    _, topk_ids = routing(T, k, E, ep_drop, gen)
    slots = token_slots(T, L, gen)
    enabled = adapter_flags(slots, L)
    groups = torch_ops.moe_lora_groups(topk_ids, slots, enabled)
    written = torch.cat([g[2] for g in groups])
    S, P = len(Ns), T * k
    x = torch.randn(T if gather_rows else P, K, generator=gen).to(DEVICE, dtype)
    lora_a = factors([(L, E, R, K)] * S, K, dtype, gen)
    want = torch.full((S, P, R), NAN, device=DEVICE)
    torch_ops.fused_moe_lora_shrink(x, lora_a, groups, k, gather_rows, want)
    for parts, config in ((1, None), (2, dict(BLOCK_SIZE_K=16, SPLIT_K=2, num_warps=4))):
        got = torch.full((parts, S, P, R), NAN, device=DEVICE)
        moe_lora.fused_moe_lora_shrink_by_pair(x, lora_a, topk_ids, slots, enabled, gather_rows,
                                               got, config)
        check_shrink_out(got, want, written, dtype)


# T, k, E, max_loras, rank, intermediate (N), activation kind, interleaved
ACTIVATION_SHRINK_CASES = [
    (1, 1, 4, 1, 8, 48, "silu", False),
    (5, 2, 8, 3, 64, 200, "swigluoai", True),    # 128-column programs: 2 parts
    (12, 4, 6, 8, 16, 1100, "silu", False),      # 512-column programs: 3 parts
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ACTIVATION_SHRINK_CASES,
                         ids=lambda c: f"T{c[0]}-k{c[1]}-R{c[4]}-N{c[5]}-{c[6]}")
def test_gated_activation_with_pair_shrink(dtype, case):
    """The activation writes the same rows with or without the shrink, and
    the shrink's parts add up to the reference shrink of those rows."""
    from vllm.model_executor.layers.fused_moe.kernels.gated_activation import (
        gated_activation_triton)
    T, k, E, L, R, N, kind, interleaved = case
    gen = torch.Generator().manual_seed(T * 7 + N)
    _, topk_ids = routing(T, k, E, 0.2, gen)
    slots = token_slots(T, L, gen)
    enabled = adapter_flags(slots, L)
    cache1 = (torch.randn(T * k, 2 * N, generator=gen) * 3).to(DEVICE, dtype)
    lora_a = factors([(L, E, R, N)], N, dtype, gen)[0]
    parts = moe_lora.pair_shrink_parts(N, R)
    got = torch.full((parts, 1, T * k, R), NAN, device=DEVICE)
    shrink = moe_lora.MoELoRAPairShrink(lora_a, topk_ids, slots, enabled, got)
    cache2 = gated_activation_triton(cache1, kind, interleaved, lora_shrink=shrink)
    assert torch.equal(cache2, gated_activation_triton(cache1, kind, interleaved))
    groups = torch_ops.moe_lora_groups(topk_ids, slots, enabled)
    written = torch.cat([g[2] for g in groups])
    want = torch.full((1, T * k, R), NAN, device=DEVICE)
    torch_ops.fused_moe_lora_shrink(cache2, [lora_a], groups, k, False, want)
    check_shrink_out(got, want, written, dtype)


def test_pair_shrink_rejects_what_does_not_fit():
    from vllm.model_executor.layers.fused_moe.kernels.gated_activation import (
        gated_activation_triton)
    topk_ids = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    slots = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    enabled = torch.ones(1, dtype=torch.int32, device=DEVICE)
    lora_a = torch.zeros(1, 1, 16, 64, device=DEVICE)
    assert moe_lora.pair_shrink_parts(8192, 16) is None   # more parts than the epilogue adds
    out = torch.zeros(1, 1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="do not fit"):   # 32 columns, factors of 64
        gated_activation_triton(torch.zeros(4, 64, device=DEVICE), lora_shrink=moe_lora
                                .MoELoRAPairShrink(lora_a, topk_ids, slots, enabled, out))
    with pytest.raises(ValueError, match="shrink output"):
        gated_activation_triton(torch.zeros(4, 128, device=DEVICE), lora_shrink=moe_lora
                                .MoELoRAPairShrink(lora_a, topk_ids, slots, enabled, out[:, :, :3]))


def test_moe_lora_block_size():
    assert moe_lora.moe_lora_block_size(1, 64, 4) == 16
    assert moe_lora.moe_lora_block_size(128 * 8, 64, 4) == 16
    assert moe_lora.moe_lora_block_size(4096 * 8, 64, 8) == 64
    sizes = [moe_lora.moe_lora_block_size(n, 8, 2) for n in (16, 400, 800, 8000)]
    assert sizes == sorted(sizes)


def test_argument_checks():
    gen = torch.Generator().manual_seed(1)
    T, k, E, L, R, K = 4, 2, 4, 2, 16, 32
    _, topk_ids = routing(T, k, E, 0.0, gen)
    slots = token_slots(T, L, gen)
    align = moe_lora_align_block_size(topk_ids, slots, 16, E, L)
    enabled = torch.ones(L, dtype=torch.int32, device=DEVICE)
    x = torch.randn(T, K, generator=gen).to(DEVICE)
    a = factors([(L, E, R, K)], K, torch.float32, gen)
    out = torch.empty(1, T * k, R, device=DEVICE)
    with pytest.raises(ValueError, match="block_size_m"):
        moe_lora.fused_moe_lora_shrink(x, a, *align, enabled, k, True, out, 32)
    with pytest.raises(ValueError, match="factors are"):
        moe_lora.fused_moe_lora_shrink(x.half(), a, *align, enabled, k, True, out, 16)
    mapping = LoRATokenMapping.build(slots, L)
    ragged = [torch.randn(L, R, K, device=DEVICE), torch.randn(L, K, R, device=DEVICE).mT]
    with pytest.raises(ValueError, match="inner strides"):
        lora_ops.lora_shrink(x, ragged, mapping, torch.empty(2, T, R, device=DEVICE))
    with pytest.raises(ValueError, match="SPLIT_K 2 but the shrink output has 1 parts"):
        lora_ops.lora_shrink(x, [ragged[0]], mapping, torch.empty(1, T, R, device=DEVICE),
                             config=dict(BLOCK_SIZE_M=16, BLOCK_SIZE_K=16, SPLIT_K=2,
                                         num_warps=4, num_stages=2))
    with pytest.raises(ValueError, match="float32"):
        lora_ops.lora_shrink(x, [ragged[0]], mapping, torch.empty(1, T, R + 1, device=DEVICE))
    b = [torch.randn(L, 24, R, device=DEVICE)]
    with pytest.raises(ValueError, match="outside"):
        lora_ops.lora_expand(torch.zeros(1, T, R, device=DEVICE), b, mapping,
                             torch.zeros(T, 30, device=DEVICE), [8])


def test_slice_tables_are_cached():
    ws = [torch.randn(2, 16, 32, device=DEVICE) for _ in range(3)]
    table, _, _ = lora_ops.slice_table(ws, 1, [0, 16, 32])
    assert lora_ops.slice_table(ws, 1, [0, 16, 32])[0] is table
    assert table[:, 0].tolist() == [w.data_ptr() for w in ws]
    assert table[:, 3].tolist() == [16] * 3 and table[:, 4].tolist() == [0, 16, 32]


def test_factor_alignment_holds_for_every_table_value():
    """The kernels mark factor pointers, strides, N_s and offsets as multiples
    of the table's alignment; a wrong mark misreads or faults on the GPU."""
    buf = torch.zeros(4096, dtype=torch.bfloat16)
    whole = buf[:2 * 3 * 16 * 32].view(2, 3, 16, 32)
    assert lora_ops.slice_table([whole], 2, [0])[2] == 8          # 16 bytes of bf16
    assert lora_ops.slice_table([whole.float()], 2, [0])[2] == 4
    shifted = buf[2:2 + 2 * 3 * 16 * 32].view(2, 3, 16, 32)       # pointer 4 bytes off
    assert lora_ops.slice_table([whole, shifted], 2, [0, 16])[2] == 2
    assert lora_ops.slice_table([whole], 2, [12])[2] == 4          # column offset
    assert lora_ops.slice_table([buf[:2 * 3 * 12 * 32].view(2, 3, 12, 32)], 2, [0])[2] == 4
    rank_one = buf[:2 * 3 * 32].view(2, 3, 1, 32)                  # strides 96 and 32
    assert lora_ops.slice_table([rank_one], None)[2] == 8
    assert lora_ops.slice_table([buf[:2 * 5 * 33].view(2, 5, 33)], None)[2] == 1


def test_moe_lora_skips_blocks_past_padded_length_or_of_expert_minus_one():
    """Blocks are skipped on ``num_pairs_post_padded`` and expert -1 alone,
    whatever the rest of the alignment holds."""
    gen = torch.Generator().manual_seed(5)
    T, k, E, L, R, N, K, block = 40, 2, 2, 1, 16, 24, 32, 16
    _, topk_ids = routing(T, k, E, 0.0, gen)
    slots = token_slots(T, L, gen)
    enabled = torch.ones(L, dtype=torch.int32, device=DEVICE)
    sorted_ids, expert_ids, npp = moe_lora_align_block_size(topk_ids, slots, block, E, L)
    assert int(npp[0]) >= 3 * block
    npp[0] = 2 * block
    expert_ids[0, 0] = -1
    kept = sorted_ids[0, block:2 * block]
    kept = kept[kept < T * k].long()
    groups = [(0, int(expert_ids[0, 1]), kept)]

    x = torch.randn(T, K, generator=gen).to(DEVICE)
    lora_a = factors([(L, E, R, K)], K, torch.float32, gen)
    lora_b = factors([(L, E, N, R)], R, torch.float32, gen)
    align = (sorted_ids, expert_ids, npp, enabled)
    want = torch.full((1, T * k, R), NAN, device=DEVICE)
    torch_ops.fused_moe_lora_shrink(x, lora_a, groups, k, True, want)
    got = torch.full_like(want, NAN)
    moe_lora.fused_moe_lora_shrink(x, lora_a, *align, k, True, got, block)
    check_shrink_out(got, want, kept, torch.float32)

    y = torch.randn(T * k, N, generator=gen).to(DEVICE)
    before = y.clone()
    y_want = y.clone()
    torch_ops.fused_moe_lora_expand(want, lora_b, groups, y_want, [0])
    moe_lora.fused_moe_lora_expand(want, lora_b, *align, y, [0])
    torch.testing.assert_close(y, y_want, **TOL[torch.float32])
    assert_untouched(y, before, kept, [0], (N,))
