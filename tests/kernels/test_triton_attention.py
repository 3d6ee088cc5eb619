"""TritonAttentionBackend against the torch reference backend.

On CPU the kernel runs in Triton's interpreter, whose bf16 ``tl.dot`` is
wrong, so those tests use float32/float16 and small shapes; the bf16 check
runs on CUDA only.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from vllm.model_executor.layers.attention.backend import AttentionMetadata
from vllm.model_executor.layers.attention.torch_ref import TorchAttentionBackend
from vllm.model_executor.layers.attention.triton_paged import TritonAttentionBackend

TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}


def make_batch(seqs: list[tuple[int, int]], block_size: int, num_heads: int,
               num_kv_heads: int, head_size: int, dtype: torch.dtype, device: str,
               seed: int = 0):
    """Random inputs for sequences given as (cached tokens, new tokens).

    Blocks are handed out in shuffled order. The cached tokens hold random
    keys/values; every cache row no sequence owns is NaN, so a read past a
    sequence (or through a padded block-table entry) poisons the output.
    """
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [cached + new for cached, new in seqs]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    block_ids = torch.randperm(num_blocks, generator=gen).tolist()
    spare = block_ids[-1]
    max_blocks = max(blocks_per_seq) + 1
    block_tables = torch.full((len(seqs), max_blocks), spare, dtype=torch.int32)

    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_size), float("nan"),
                          dtype=dtype)
    slots, starts = [], [0]
    for i, ((cached, new), n_blocks) in enumerate(zip(seqs, blocks_per_seq)):
        owned = block_ids[:n_blocks]
        del block_ids[:n_blocks]
        block_tables[i, :n_blocks] = torch.tensor(owned, dtype=torch.int32)
        seq_slots = [owned[p // block_size] * block_size + p % block_size
                     for p in range(cached + new)]
        flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_size)
        flat[:, seq_slots[:cached]] = torch.randn(2, cached, num_kv_heads, head_size,
                                                  generator=gen).to(dtype)
        slots += seq_slots[cached:]
        starts.append(starts[-1] + new)

    num_tokens = starts[-1]
    q = torch.randn(num_tokens, num_heads, head_size, generator=gen).to(dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)
    sinks = 2 * torch.randn(num_heads, generator=gen)
    meta = AttentionMetadata(
        num_seqs=len(seqs), num_tokens=num_tokens,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(new for _, new in seqs),
        query_start_loc_cpu=starts, seq_lens_cpu=seq_lens)
    tensors = [t.to(device) for t in (q, k, v, kv_cache, sinks)]
    return (*tensors, meta)


@contextlib.contextmanager
def nan_filled_empty():
    """Make the backend's output allocation NaN, so unwritten rows show up."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    torch.empty = poisoned
    try:
        yield
    finally:
        torch.empty = real_empty


def run_both(backend: TritonAttentionBackend, seqs, block_size, num_heads, num_kv_heads,
             head_size, dtype, device="cpu", sliding_window=None, use_sinks=False,
             reference_dtype=None, seed=0):
    q, k, v, kv_cache, sinks, meta = make_batch(seqs, block_size, num_heads, num_kv_heads,
                                                head_size, dtype, device, seed)
    sinks = sinks if use_sinks else None
    scale = head_size ** -0.5
    ref_dtype = reference_dtype or dtype
    cache = kv_cache.clone()
    expected = TorchAttentionBackend().forward(
        q.to(ref_dtype), k.to(ref_dtype), v.to(ref_dtype), kv_cache.to(ref_dtype), meta, scale,
        sliding_window, sinks)

    with nan_filled_empty():
        out = backend.forward(q, k, v, cache, meta, scale, sliding_window, sinks)
    # The backend's own cache write must match the reference's.
    written = cache.view(2, -1, num_kv_heads, head_size)[:, meta.slot_mapping.cpu()]
    torch.testing.assert_close(written, torch.stack([k, v]), rtol=0, atol=0)
    return out, expected.to(dtype)


def assert_close(out: torch.Tensor, expected: torch.Tensor):
    assert not out.isnan().any()
    rtol, atol = TOLERANCES[out.dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)


# (cached tokens, new tokens): decodes, a fresh prompt, prefill chunks after
# cached chunks, and a sequence with no new tokens (a padded batch slot).
MIXED = [(9, 1), (0, 13), (21, 1), (6, 11), (0, 1), (3, 0), (33, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 2), (4, 1)])
def test_mixed_batch(dtype, block_size, num_heads, num_kv_heads):
    # Small tiles so sequences span several query tiles and key tiles.
    backend = TritonAttentionBackend(block_m=16, block_n=16)
    out, expected = run_both(backend, MIXED, block_size, num_heads, num_kv_heads, 16, dtype)
    assert_close(out, expected)


@pytest.mark.parametrize("head_size", [8, 32, 40])
@pytest.mark.parametrize("sliding_window,use_sinks", [(None, False), (7, False), (None, True),
                                                      (5, True)])
def test_head_sizes_windows_sinks(head_size, sliding_window, use_sinks):
    backend = TritonAttentionBackend(block_m=16, block_n=16)
    out, expected = run_both(backend, MIXED, 4, 4, 2, head_size, torch.float32,
                             sliding_window=sliding_window, use_sinks=use_sinks, seed=1)
    assert_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_odd_group_window_sinks(dtype):
    # Three query heads per KV head: tiles hold a non-power-of-two number of tokens.
    backend = TritonAttentionBackend(block_m=16, block_n=16)
    out, expected = run_both(backend, MIXED, 4, 6, 2, 40, dtype, sliding_window=6,
                             use_sinks=True, seed=2)
    assert_close(out, expected)


@pytest.mark.parametrize("seqs", [[(5, 1), (17, 1), (0, 1), (40, 1)],  # decode only
                                  [(0, 30), (0, 3)],                     # prefill only
                                  MIXED])
def test_default_tiles(seqs):
    out, expected = run_both(TritonAttentionBackend(), seqs, 16, 8, 2, 32, torch.float32, seed=3)
    assert_close(out, expected)


def test_strided_query():
    # Models split q out of a fused qkv projection, so q's token stride is wider than Hq * D.
    q, k, v, kv_cache, _, meta = make_batch(MIXED, 4, 4, 2, 16, torch.float32, "cpu")
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    strided_q = qkv[:, :q[0].numel()].view(q.shape)
    assert not strided_q.is_contiguous()
    expected = TorchAttentionBackend().forward(q, k, v, kv_cache.clone(), meta, 0.25)
    with nan_filled_empty():
        out = TritonAttentionBackend(block_m=16, block_n=16).forward(strided_q, k, v, kv_cache,
                                                                     meta, 0.25)
    assert_close(out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("head_size", [64, 80, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 2), (16, 2)])
@pytest.mark.parametrize("sliding_window,use_sinks", [(None, False), (128, True)])
def test_bfloat16_cuda(head_size, num_heads, num_kv_heads, sliding_window, use_sinks):
    seqs = [(300, 1), (0, 257), (700, 1), (129, 64), (0, 1), (50, 0), (1000, 1)]
    out, expected = run_both(TritonAttentionBackend(), seqs, 16, num_heads, num_kv_heads,
                             head_size, torch.bfloat16, device="cuda",
                             sliding_window=sliding_window, use_sinks=use_sinks,
                             reference_dtype=torch.float32)
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
