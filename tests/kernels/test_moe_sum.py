"""The Triton MoE sum against its torch reference (kernels/moe_sum.py):
float32 and float16 under Triton's interpreter on CPU, bfloat16 too on a GPU."""
import pytest
import torch

from vllm.model_executor.layers.fused_moe.kernels.moe_sum import moe_sum_torch, moe_sum_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton 3.6's interpreter casts fp32 to bf16 by truncation, not to nearest
# as the GPU and torch do, so bf16 can only be compared on a GPU.
BF16_ON_GPU = pytest.param(torch.bfloat16, marks=pytest.mark.gpu)
# Random normals: the kernel adds the k rows in order, torch in its own
# (on CPU they differ by up to 2 fp32 ulps at k=22), so the fp32 sums differ
# by up to about k * eps32 * sum|x| (absolute: a result near zero can carry
# the error of its larger terms), and that can flip the final rounding of a
# half-precision result by one unit in its last place.
TOL = {torch.float32: dict(rtol=1e-6, atol=3e-5), torch.float16: dict(rtol=2**-10, atol=1e-3),
       torch.bfloat16: dict(rtol=2**-7, atol=1e-2)}


def dyadic(rows: int, cols: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Multiples of 1/256 in [-8, 8): exact in fp32 and fp16 (bf16 rounds them
    to coarser multiples), and any sum of up to 22 of them is exact in fp32
    whatever the order, so the kernel and torch must agree bit for bit. The
    sums need more bits than fp16/bf16 hold, so one rounding vs one per
    expert is still told apart."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-2048, 2048, (rows, cols), generator=g) / 256).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16_ON_GPU])
@pytest.mark.parametrize("H", [64, 100, 2048])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("T", [1, 3, 17])
def test_moe_sum_matches_torch_exactly(T, k, H, dtype):
    x = dyadic(T * k, H, T * 1000 + k * 10 + H, dtype)
    got = torch.empty(T, H, dtype=dtype, device=DEVICE)
    want = torch.empty_like(got)
    moe_sum_triton(x, k, got)
    moe_sum_torch(x, k, want)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16_ON_GPU])
@pytest.mark.parametrize("k", [1, 8, 22])
def test_moe_sum_random_normal(k, dtype):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(5 * k, 300, generator=g).to(DEVICE, dtype)
    got, want = (torch.empty(5, 300, dtype=dtype, device=DEVICE) for _ in range(2))
    moe_sum_triton(x, k, got)
    moe_sum_torch(x, k, want)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, BF16_ON_GPU])
def test_moe_sum_strided_rows(dtype):
    """Row strides of x and out other than H are honoured, and the memory
    around out's column slice is left alone."""
    T, k, H = 3, 2, 100
    x = dyadic(T * k, H + 28, 7, dtype)[:, 5:5 + H]
    buf = torch.full((T, H + 16), -123.0, dtype=dtype, device=DEVICE)
    out = buf[:, 8:8 + H]
    assert out.stride(0) != H and x.stride(0) != H
    moe_sum_triton(x, k, out)
    want = torch.empty(T, H, dtype=dtype, device=DEVICE)
    moe_sum_torch(x, k, want)
    assert torch.equal(out, want)
    assert (buf[:, :8] == -123.0).all() and (buf[:, 8 + H:] == -123.0).all()


def test_moe_sum_no_tokens():
    out = torch.empty(0, 64, device=DEVICE)
    moe_sum_triton(torch.empty(0, 64, device=DEVICE), 8, out)
    assert out.shape == (0, 64)


def test_moe_sum_rejects_bad_shapes():
    x = torch.zeros(6, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"expected x \[4, 64\]"):
        moe_sum_triton(x, 2, torch.empty(2, 64, device=DEVICE))  # T*k = 4 rows, not 6
    with pytest.raises(ValueError, match=r"expected x \[6, 32\]"):
        moe_sum_triton(x, 2, torch.empty(3, 32, device=DEVICE))
    with pytest.raises(ValueError, match="top_k"):
        moe_sum_triton(x, 0, torch.empty(3, 64, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[T\*k, H\]"):
        moe_sum_triton(x.view(6, 8, 8), 2, torch.empty(3, 64, device=DEVICE))
    with pytest.raises(ValueError, match="unit column strides"):
        moe_sum_triton(x, 2, torch.empty(64, 3, device=DEVICE).t())
