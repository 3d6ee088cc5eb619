"""RMSNorm, computed in float32 like the Hugging Face reference."""
import torch
from torch import nn

from vllm.distributed.parallel_state import DeviceGroup
from vllm.model_executor.layers.linear import WeightShapeError


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """With ``residual``, first adds it to ``x`` and also returns the sum
        (the next residual), as pre-norm decoder layers need."""
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a vector split across tensor-parallel ranks (OLMoE's q/k
    norms span every head): each rank holds its slice of the weight, and the
    mean square is summed across ranks."""

    def __init__(self, full_size: int, eps: float, dtype: torch.dtype, tp: DeviceGroup):
        super().__init__()
        if full_size % tp.world_size:
            raise ValueError(f"norm size {full_size} is not divisible by {tp.world_size} ranks")
        self.tp = tp
        self.full_size = full_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(full_size // tp.world_size, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self._load

    def _load(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        if loaded.shape != (self.full_size,):
            raise WeightShapeError(f"shape {tuple(loaded.shape)} does not match the expected "
                                   f"({self.full_size},)")
        n = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp.rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        square_sum = self.tp.all_reduce(h.pow(2).sum(-1, keepdim=True))
        h = h * torch.rsqrt(square_sum / self.full_size + self.eps)
        return self.weight * h.to(dtype)
