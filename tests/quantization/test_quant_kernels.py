"""Triton quantized expert GEMMs against their torch references.

On the CPU they run in Triton's interpreter: the W8A8 kernel on float32
copies of FP8 values (numpy has no FP8; the kernel only multiplies and
scales, so the values are what matters), the weight-only kernel on float32
activations with its real uint8 codes and raw E4M3 / E8M0 scale bytes. On a
GPU (``-m gpu``) the W8A8 kernel runs on real float8_e4m3fn tensors and
both on bf16 activations."""
import pytest
import torch
import triton
import triton.language as tl

from vllm.model_executor.layers.fused_moe.kernels.fused_moe_w8a8 import (
    fused_moe_w8a8_gemm_torch, invoke_fused_moe_w8a8_gemm)
from vllm.model_executor.layers.fused_moe.kernels.fused_moe_weight_only import (
    _e2m1_to_f32, _e4m3_to_f32, _e8m0_to_f32, fused_moe_weight_only_gemm_torch,
    invoke_fused_moe_weight_only_gemm)
from vllm.model_executor.layers.fused_moe.moe_align import moe_align_block_size
from vllm.model_executor.quantization.fp8_activation import Fp8ActScheme, quantize_fp8_act


def _aligned(T, k, E, block, g, device):
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    ids[0, 0] = -1  # a pair routed to another rank
    s, e, n = moe_align_block_size(ids.to(device), block, E)
    return ids, dict(sorted_pair_ids=s, expert_ids=e, num_pairs_post_padded=n, top_k=k)


def _w8a8_case(kind, gather, device, fp8, T=9, k=2, E=4, N=48, K=64, gk=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = T if gather else T * k
    x = torch.randn(rows, K, generator=g)
    w = torch.randn(E, N, K, generator=g) * 0.1
    if kind == "block":
        scheme = Fp8ActScheme("group", gk)
        wq_scale = torch.rand(E, N, K // gk, generator=g) * 0.01 + 1e-3
        wq = (w / wq_scale.repeat_interleave(gk, 2)).clamp(-448, 448).to(torch.float8_e4m3fn)
    else:
        scheme = Fp8ActScheme("static") if kind == "static" else Fp8ActScheme("token")
        wq_scale = torch.rand(E, N, generator=g) * 0.01 + 1e-3
        wq = (w / wq_scale.unsqueeze(2)).clamp(-448, 448).to(torch.float8_e4m3fn)
    xq, xs = quantize_fp8_act(x, scheme, torch.tensor([0.01]))
    ids, aligned = _aligned(T, k, E, 16, g, device)
    topk = torch.rand(T, k, generator=g)
    bias = torch.randn(E, N, generator=g) * 0.1
    if not fp8:  # the interpreter: float32 copies of the FP8 values
        xq, wq = xq.float(), wq.float()
    to = lambda t: t.to(device)  # noqa: E731
    return [to(xq), to(xs), to(wq), to(wq_scale)], dict(
        aligned, gather_rows=gather, group_k=gk if kind == "block" else None, bias=to(bias),
        topk_weights=None if gather else to(topk)), T * k, N


def _run_w8a8(device, fp8, kind, gather, out_dtype, tol):
    args, kw, M, N = _w8a8_case(kind, gather, device, fp8)
    c = torch.full((M, N), float("nan"), device=device, dtype=out_dtype)
    ref = torch.full_like(c, float("nan"))
    invoke_fused_moe_w8a8_gemm(*args, c, **kw)
    fused_moe_w8a8_gemm_torch(*args, ref, **kw)
    written = ~ref.isnan()
    assert torch.equal(written, ~c.isnan()), "different rows written"
    err = ((c[written].float() - ref[written].float()).abs().max()
           / ref[written].float().abs().max()).item()
    assert err < tol, err


@pytest.mark.parametrize("kind", ["token", "static", "block"])
@pytest.mark.parametrize("gather", [True, False])
def test_w8a8_gemm_interpreter(kind, gather):
    _run_w8a8("cpu", False, kind, gather, torch.float32, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["token", "static", "block"])
@pytest.mark.parametrize("gather", [True, False])
def test_w8a8_gemm_gpu(kind, gather):
    _run_w8a8("cuda", True, kind, gather, torch.bfloat16, 1e-2)


def _weight_only_case(fmt, gather, device, dtype, T=9, k=2, E=4, N=48, K=64, seed=0, group=None):
    g = torch.Generator().manual_seed(seed)
    group = group or {"int4": 32, "nvfp4": 16, "mxfp4": 32}[fmt]
    rows = T if gather else T * k
    x = torch.randn(rows, K, generator=g).to(dtype)
    packed = torch.randint(0, 256, (E, N, K // 2), generator=g, dtype=torch.uint8)
    channel = None
    if fmt == "int4":
        scale = (torch.rand(E, N, K // group, generator=g) * 0.1).to(dtype)
    elif fmt == "nvfp4":
        # every finite E4M3 byte (0x7f / 0xff are NaN), subnormals included
        valid = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
        scale = valid[torch.randint(0, len(valid), (E, N, K // group), generator=g)]
        channel = torch.rand(E, N, generator=g) * 1e-3
    else:
        scale = torch.randint(117, 130, (E, N, K // group), generator=g, dtype=torch.uint8)
    ids, aligned = _aligned(T, k, E, 16, g, device)
    topk = torch.rand(T, k, generator=g)
    bias = torch.randn(E, N, generator=g).to(dtype)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return [to(x), to(packed), to(scale)], dict(
        aligned, weight_format=fmt, group_size=group, gather_rows=gather,
        channel_scale=to(channel), bias=to(bias),
        topk_weights=None if gather else to(topk)), T * k, N


def _run_weight_only(device, fmt, gather, dtype, tol, **case):
    args, kw, M, N = _weight_only_case(fmt, gather, device, dtype, **case)
    c = torch.full((M, N), float("nan"), device=device, dtype=dtype)
    ref = torch.full_like(c, float("nan"))
    invoke_fused_moe_weight_only_gemm(*args, c, **kw)
    fused_moe_weight_only_gemm_torch(*args, ref, **kw)
    written = ~ref.isnan()
    assert torch.equal(written, ~c.isnan()), "different rows written"
    err = ((c[written].float() - ref[written].float()).abs().max()
           / ref[written].float().abs().max()).item()
    assert err < tol, err


@pytest.mark.parametrize("fmt", ["int4", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("gather", [True, False])
def test_weight_only_gemm_interpreter(fmt, gather):
    _run_weight_only("cpu", fmt, gather, torch.float32, 1e-5)


# K tiles spanning several groups, exactly one, or a part of one; K not a
# multiple of the tile
@pytest.mark.parametrize("group,K", [(16, 96), (128, 256), (64, 192)])
def test_weight_only_gemm_group_tiling_interpreter(group, K):
    _run_weight_only("cpu", "int4", True, torch.float32, 1e-5, group=group, K=K)


def test_weight_only_kernel_rejects_odd_groups():
    with pytest.raises(ValueError, match="power-of-two group size"):
        _run_weight_only("cpu", "int4", True, torch.float32, 1e-5, group=24, K=48)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int4", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("gather", [True, False])
def test_weight_only_gemm_gpu(fmt, gather):
    _run_weight_only("cuda", fmt, gather, torch.bfloat16, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("group,K", [(16, 96), (128, 256), (64, 192)])
def test_weight_only_gemm_group_tiling_gpu(group, K):
    _run_weight_only("cuda", "int4", True, torch.bfloat16, 2e-2, group=group, K=K)


def test_kernel_input_errors():
    args, kw, M, N = _weight_only_case("int4", True, "cpu", torch.float32)
    with pytest.raises(ValueError, match="group scales"):
        invoke_fused_moe_weight_only_gemm(args[0], args[1], args[2][..., :1],
                                          torch.empty(M, N), **kw)
    args, kw, M, N = _w8a8_case("token", True, "cpu", False)
    with pytest.raises(ValueError, match="per-channel weight scale"):
        invoke_fused_moe_w8a8_gemm(args[0], args[1], args[2], args[3][:, :1],
                                   torch.empty(M, N), **kw)


@triton.jit
def _decode_kernel(x_ptr, e4m3_ptr, e8m0_ptr, e2m1_ptr):
    offs = tl.arange(0, 256)
    b = tl.load(x_ptr + offs)
    tl.store(e4m3_ptr + offs, _e4m3_to_f32(b))
    tl.store(e8m0_ptr + offs, _e8m0_to_f32(b))
    tl.store(e2m1_ptr + offs, _e2m1_to_f32(b.to(tl.int32) & 15))


def test_scale_decoders_exhaustive():
    """The kernel's in-register E4M3 / E8M0 / E2M1 decoders on every byte."""
    decode = _decode_kernel
    x = torch.arange(256, dtype=torch.uint8)
    e4m3, e8m0, e2m1 = (torch.empty(256) for _ in range(3))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, e4m3, e8m0, e2m1 = (t.to(dev) for t in (x, e4m3, e8m0, e2m1))
    decode[(1,)](x, e4m3, e8m0, e2m1)
    x, e4m3, e8m0, e2m1 = (t.cpu() for t in (x, e4m3, e8m0, e2m1))
    ref = x.view(torch.float8_e4m3fn).float()
    finite = ~ref.isnan()
    assert torch.equal(e4m3[finite], ref[finite])
    assert torch.equal(e8m0, torch.tensor([2.0 ** (int(b) - 127) for b in range(256)]))
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert torch.equal(e2m1, torch.tensor([(-1.0 if b & 8 else 1.0) * table[b & 7]
                                           for b in range(256)]))
