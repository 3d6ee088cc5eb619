"""MoE quant methods: create the expert parameters of a FusedMoE layer and
run them through a FusedMoEKernel. Quantized schemes subclass
``FusedMoEMethodBase`` in vllm/model_executor/quantization/."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from vllm.model_executor.layers.fused_moe.experts.base import ExpertWeights, FusedMoEExperts
from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEKernel
from vllm.model_executor.layers.fused_moe.oracle import select_experts_backend
from vllm.model_executor.layers.fused_moe.prepare_finalize import ReplicatedTokensPrepareAndFinalize
from vllm.model_executor.layers.linear import new_param

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE


class FusedMoEMethodBase(ABC):
    """``kernel`` serves steps with a LoRA context (a LoRA-capable backend
    when adapters are enabled); ``base_kernel`` serves every other step. With
    ``--moe-backend auto`` the latter is the best backend regardless of LoRA
    support, so steps whose adapters leave the layer alone pay nothing for
    ``--enable-lora``."""
    scheme: str = ""
    group_size: int = 0     # weights quantized in groups along K (0: not grouped)
    kernel: FusedMoEKernel
    base_kernel: FusedMoEKernel

    @abstractmethod
    def create_weights(self, layer: "FusedMoE") -> None: ...

    @abstractmethod
    def expert_weights(self, layer: "FusedMoE") -> ExpertWeights: ...

    @abstractmethod
    def backends(self) -> tuple[type[FusedMoEExperts], ...]: ...

    def build_kernel(self, layer: "FusedMoE") -> None:
        moe = layer.moe_config
        prepare_finalize = ReplicatedTokensPrepareAndFinalize(layer.parallel.tp)
        cls = select_experts_backend(moe, self.backends(), layer.moe_backend, layer.lora_enabled)
        self.kernel = self.base_kernel = FusedMoEKernel(prepare_finalize, cls(moe))
        if layer.lora_enabled and layer.moe_backend == "auto":
            base_cls = select_experts_backend(moe, self.backends(), "auto", False)
            if base_cls is not cls:
                self.base_kernel = FusedMoEKernel(prepare_finalize, base_cls(moe))

    def kernels(self) -> list[FusedMoEKernel]:
        return list(dict.fromkeys([self.kernel, self.base_kernel]))

    def process_weights_after_loading(self, layer: "FusedMoE") -> None:
        return None

    def apply(self, layer: "FusedMoE", hidden_states: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, lora_context: "MoELoRAContext | None" = None) -> torch.Tensor:
        kernel = self.kernel if lora_context is not None else self.base_kernel
        return kernel.forward(hidden_states, self.expert_weights(layer), topk_weights, topk_ids,
                              expert_map=layer.expert_map, lora_context=lora_context)


class UnquantizedFusedMoEMethod(FusedMoEMethodBase):
    scheme = "unquantized"

    def create_weights(self, layer: "FusedMoE") -> None:
        cfg = layer.moe_config
        E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        dtype, loader = cfg.dtype, layer.weight_loader
        layer.w13_weight = new_param((E, 2 * I, H), dtype, weight_loader=loader)
        layer.w2_weight = new_param((E, H, I), dtype, weight_loader=loader)
        if cfg.has_bias:
            layer.w13_bias = new_param((E, 2 * I), dtype, weight_loader=loader)
            layer.w2_bias = new_param((E, H), dtype, weight_loader=loader)

    def expert_weights(self, layer: "FusedMoE") -> ExpertWeights:
        return ExpertWeights(layer.w13_weight, layer.w2_weight,
                             getattr(layer, "w13_bias", None), getattr(layer, "w2_bias", None))

    def backends(self):
        from vllm.model_executor.layers.fused_moe.oracle import unquantized_backends
        return unquantized_backends()
