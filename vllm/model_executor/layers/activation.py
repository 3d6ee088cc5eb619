"""Gated activations on a fused [gate | up] (or interleaved) projection."""
import torch
import torch.nn.functional as F

_ACTS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def gated_activation(x: torch.Tensor, kind: str = "silu", interleaved: bool = False,
                     alpha: float = 1.702, limit: float | None = 7.0) -> torch.Tensor:
    """``act(gate) * up`` over the last dimension of ``x``.

    ``interleaved`` means gate and up alternate (gate = x[..., 0::2]);
    otherwise the first half is gate and the second up. ``kind="swigluoai"``
    is GPT-OSS's clamped SwiGLU: ``(up + 1) * g * sigmoid(alpha * g)`` with
    gate clamped above at ``limit`` and up clamped to [-limit, limit].
    """
    if interleaved:
        gate, up = x[..., 0::2], x[..., 1::2]
    else:
        gate, up = x.chunk(2, dim=-1)
    if kind == "swigluoai":
        if limit is not None:
            gate = gate.clamp(max=limit)
            up = up.clamp(min=-limit, max=limit)
        return (up + 1) * gate * torch.sigmoid(gate * alpha)
    if kind not in _ACTS:
        raise ValueError(f"unsupported activation {kind!r}")
    return _ACTS[kind](gate) * up
