"""Native ops (csrc/) against the torch references: alignment bit for bit,
routing ids exactly and weights to rounding."""
import multiprocessing
import os
import shutil

import pytest
import torch

from vllm import native
from vllm.model_executor.layers.fused_moe.moe_align import (moe_align_block_size,
                                                            moe_align_block_size_torch,
                                                            moe_lora_align_block_size,
                                                            moe_lora_align_block_size_torch)
from vllm.model_executor.layers.fused_moe.router import RouterConfig, select_experts_torch

CASES = [(T, k, E, bs) for T in (1, 3, 17, 64, 300) for k in (1, 2, 8) for E in (1, 4, 33, 128)
         for bs in (16, 64) if k <= E]


def random_ids(T, k, E, g, ep=False):
    ids = torch.rand(T, E, generator=g).topk(k).indices.to(torch.int32)
    if ep:  # experts on other ranks map to -1
        ids[torch.rand(T, k, generator=g) < 0.3] = -1
    return ids


def assert_bitwise(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu())


@pytest.mark.parametrize("T,k,E,bs", CASES)
def test_cpu_alignment_is_bit_exact(T, k, E, bs):
    g = torch.Generator().manual_seed(T * 1000 + k * 100 + E)
    for ep in (False, True):
        ids = random_ids(T, k, E, g, ep)
        assert_bitwise(native.moe_align(ids, bs, E), moe_align_block_size_torch(ids, bs, E))
        for L in (1, 3, 8):
            slots = torch.randint(-1, L, (T,), generator=g)
            slots[0] = -1
            assert_bitwise(native.moe_align(ids, bs, E, slots, L),
                           moe_lora_align_block_size_torch(ids, slots, bs, E, L))


def test_dispatch_env_switch(monkeypatch):
    ids = torch.randint(0, 8, (5, 2), dtype=torch.int32)
    expected = moe_align_block_size_torch(ids, 16, 8)
    for impl in ("auto", "native", "torch"):
        monkeypatch.setenv("VLLM_MOE_OPS_IMPL", impl)
        assert_bitwise(moe_align_block_size(ids, 16, 8), expected)
    slots = torch.tensor([0, -1, 1, 1, 0])
    monkeypatch.setenv("VLLM_MOE_OPS_IMPL", "native")
    assert_bitwise(moe_lora_align_block_size(ids, slots, 16, 8, 2),
                   moe_lora_align_block_size_torch(ids, slots, 16, 8, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("T,k,E,bs", CASES)
def test_cuda_alignment_is_bit_exact(T, k, E, bs):
    g = torch.Generator().manual_seed(T * 1000 + k * 100 + E)
    for ep in (False, True):
        ids = random_ids(T, k, E, g, ep).cuda()
        assert_bitwise(native.moe_align(ids, bs, E), moe_align_block_size_torch(ids, bs, E))
        slots = torch.randint(-1, 4, (T,), generator=g).cuda()
        assert_bitwise(native.moe_align(ids, bs, E, slots, 4),
                       moe_lora_align_block_size_torch(ids, slots, bs, E, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("T,k,E", [(513, 8, 128), (2048, 8, 128), (8192, 8, 128), (3000, 2, 33),
                                   (4097, 1, 4)])
@pytest.mark.parametrize("bs", [16, 64])
def test_cuda_alignment_over_many_blocks_is_bit_exact(T, k, E, bs):
    """Above 4096 pairs the alignment runs as count / scan / scatter launches
    over blocks of 2048 pairs (the last one partial here)."""
    g = torch.Generator().manual_seed(T + k + E + bs)
    for ep in (False, True):
        ids = random_ids(T, k, E, g, ep).cuda()
        assert_bitwise(native.moe_align(ids, bs, E), moe_align_block_size_torch(ids, bs, E))
        slots = torch.randint(-1, 4, (T,), generator=g).cuda()
        assert_bitwise(native.moe_align(ids, bs, E, slots, 4),
                       moe_lora_align_block_size_torch(ids, slots, bs, E, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("scoring,renorm,scale", [("softmax", True, 1.0), ("softmax", False, 1.0),
                                                  ("sigmoid", True, 2.5),
                                                  ("topk_softmax", True, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_routing_matches_torch(scoring, renorm, scale, dtype):
    g = torch.Generator().manual_seed(0)
    for T, E, k in ((1, 128, 8), (33, 64, 4), (257, 8, 2), (16, 256, 8)):
        logits = (torch.randn(T, E, generator=g) * 3).to("cuda", dtype)
        cfg = RouterConfig(k, scoring=scoring, renormalize=renorm, routed_scaling_factor=scale)
        w, ids = native.topk_route(logits, k, scoring, renorm, scale)
        ref_w, ref_ids = select_experts_torch(logits, cfg)
        # random logits have no ties: the chosen experts agree exactly
        assert torch.equal(ids.sort(1).values, ref_ids.sort(1).values)
        order, ref_order = ids.sort(1).indices, ref_ids.sort(1).indices
        torch.testing.assert_close(w.gather(1, order), ref_w.gather(1, ref_order),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cuda_native_ops_capture_in_a_graph():
    ids = torch.randint(0, 32, (8, 4), dtype=torch.int32, device="cuda")
    logits = torch.randn(8, 32, device="cuda")
    native.moe_align(ids, 16, 32)
    native.topk_route(logits, 4, "softmax", True, 1.0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        aligned = native.moe_align(ids, 16, 32)
        routed = native.topk_route(logits, 4, "softmax", True, 1.0)
    ids.copy_(torch.randint(0, 32, (8, 4), dtype=torch.int32, device="cuda"))
    graph.replay()
    assert_bitwise(aligned, moe_align_block_size_torch(ids, 16, 32))
    assert torch.equal(routed[1].sort(1).values,
                       select_experts_torch(logits, RouterConfig(4))[1].sort(1).values)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_ops_on_second_device():
    """Each rank of a parallel engine owns one GPU: the ops must launch on
    the tensors' device, whichever device the library last used."""
    g = torch.Generator().manual_seed(1)
    for device in ("cuda:1", "cuda:0", "cuda:1"):
        ids = random_ids(64, 8, 128, g).to(device)
        slots = torch.randint(-1, 4, (64,), generator=g).to(device)
        assert_bitwise(native.moe_align(ids, 16, 128, slots, 4),
                       moe_lora_align_block_size_torch(ids, slots, 16, 128, 4))
        logits = torch.randn(64, 128, generator=g).to(device)
        w, i = native.topk_route(logits, 8, "softmax", True, 1.0)
        assert i.device == logits.device
        ref = select_experts_torch(logits, RouterConfig(8))[1]
        assert torch.equal(i.sort(1).values, ref.sort(1).values)


def _library_dir_in_fresh_process(cache_home, queue):
    os.environ["XDG_CACHE_HOME"] = cache_home
    from vllm import native
    queue.put(native._library_dir())


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_ranks_building_at_once_share_one_build(tmp_path):
    """The ranks of a parallel engine reach their first MoE step together:
    with no built library, one builds and the others wait for it."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_library_dir_in_fresh_process, args=(str(tmp_path), queue))
             for _ in range(3)]
    for p in procs:
        p.start()
    dirs = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    if dirs[0] == os.path.dirname(native.__file__):
        pytest.skip("the package's own libraries are current: nothing to build")
    assert len(set(dirs)) == 1 and dirs[0] is not None, dirs
    assert os.path.isfile(os.path.join(dirs[0], "_vllm_native_cpu.so"))
