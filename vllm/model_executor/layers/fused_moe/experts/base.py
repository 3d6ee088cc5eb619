"""The experts interface of the modular MoE kernel.

An experts implementation runs both expert GEMMs and the activation for
already-routed tokens. LoRA is not bolted on from outside: every
implementation that ``supports_lora()`` calls ``apply_w13_lora`` right after
GEMM 1 and ``apply_w2_lora`` right after GEMM 2 inside its own ``apply()``,
with the ``MoELoRAContext`` it was handed explicitly.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext


@dataclass
class ExpertWeights:
    """This rank's expert parameters as the experts kernels read them.
    w13 rows are [gate | up] (or interleaved, per the activation layout)."""
    w13: torch.Tensor                    # [E_local, 2I, H]
    w2: torch.Tensor                     # [E_local, H, I]
    w13_bias: torch.Tensor | None = None  # [E_local, 2I]
    w2_bias: torch.Tensor | None = None   # [E_local, H]
    quant: Any = None                    # scheme-specific scales, see quantization/


class FusedMoEExperts(ABC):
    """Base class of every experts backend."""
    name: ClassVar[str] = ""
    # Higher wins in ``auto`` selection among backends that can run.
    priority: ClassVar[int] = 0
    # Whether apply() can be captured in a CUDA graph (no host syncs, no
    # data-dependent host control flow).
    supports_cuda_graphs: ClassVar[bool] = False
    # FusedMoEConfig.quant_scheme values whose weights apply() understands.
    quant_schemes: ClassVar[tuple[str, ...]] = ("unquantized",)

    def __init__(self, moe: FusedMoEConfig):
        self.moe = moe

    @classmethod
    @abstractmethod
    def supports_lora(cls) -> bool:
        """Whether ``apply()`` adds the LoRA deltas of a ``lora_context``."""

    @classmethod
    def unsupported_reason(cls, moe: FusedMoEConfig) -> str | None:
        """None if this backend can run ``moe`` here, else why not.
        Subclasses add their own conditions to this scheme check."""
        if moe.quant_scheme not in cls.quant_schemes:
            return f"runs {', '.join(cls.quant_schemes)} experts only"
        return None

    @abstractmethod
    def apply(self, output: torch.Tensor, hidden_states: torch.Tensor, weights: ExpertWeights,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              expert_map: torch.Tensor | None = None,
              lora_context: "MoELoRAContext | None" = None) -> None:
        """Write ``sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])``
        into ``output`` [T, H]. ``expert_map`` maps global expert ids to this
        rank's (-1 where the expert lives elsewhere)."""

    # -- LoRA hooks, called from inside apply() -------------------------------
    def apply_w13_lora(self, lora_context: "MoELoRAContext | None", hidden_states: torch.Tensor,
                       cache1: torch.Tensor, local_topk_ids: torch.Tensor) -> Any:
        """Add the adapters' w13 deltas to ``cache1`` [T*k, 2I] (row t*k + j
        belongs to token t's j-th expert). Returns the token/expert/slot
        alignment for ``apply_w2_lora`` to reuse."""
        if lora_context is None:
            return None
        return lora_context.punica.add_lora_w13(lora_context, hidden_states, cache1,
                                                local_topk_ids)

    def apply_w2_lora(self, lora_context: "MoELoRAContext | None", cache2: torch.Tensor,
                      cache3: torch.Tensor, topk_weights: torch.Tensor, alignment: Any,
                      mul_routed_weight: bool) -> None:
        """Add the adapters' w2 deltas of ``cache2`` [T*k, I] to ``cache3``
        [T*k, H], scaled by the routing weights when GEMM 2 scaled by them."""
        if lora_context is None:
            return
        lora_context.punica.add_lora_w2(lora_context, cache2, cache3, topk_weights,
                                        alignment, mul_routed_weight)


def local_expert_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    """Global expert ids -> this rank's ids (-1 for experts on other ranks)."""
    if expert_map is None:
        return topk_ids
    return expert_map[topk_ids.long()].to(topk_ids.dtype)
