"""The fused gated activation against torch's (activation.gated_activation):
float32 under Triton's interpreter on CPU, float32 and bfloat16 on a GPU."""
import pytest
import torch

from vllm.model_executor.layers.activation import gated_activation
from vllm.model_executor.layers.fused_moe.kernels.gated_activation import (
    KINDS, gated_activation_triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32,
                                   pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("kind,limit", [(k, 7.0) for k in KINDS] + [("swigluoai", None)])
@pytest.mark.parametrize("M,N", [(1, 16), (37, 96), (5, 3000)])
def test_gated_activation_matches_torch(M, N, kind, limit, interleaved, dtype):
    g = torch.Generator().manual_seed(M * N)
    # a wide range, so swigluoai's clamps at +-7 are exercised
    x = (torch.randn(M, 2 * N, generator=g) * 4).to(DEVICE, dtype)
    got = gated_activation_triton(x, kind, interleaved, alpha=1.702, limit=limit)
    want = gated_activation(x.float(), kind, interleaved, alpha=1.702, limit=limit)
    assert got.dtype == dtype and got.shape == (M, N)
    torch.testing.assert_close(got.float(), want, **TOL[dtype])


def test_gated_activation_rejects_bad_input():
    with pytest.raises(ValueError, match="unsupported activation"):
        gated_activation_triton(torch.zeros(2, 8, device=DEVICE), "relu")
    with pytest.raises(ValueError, match=r"\[M, 2N\]"):
        gated_activation_triton(torch.zeros(2, 7, device=DEVICE))
