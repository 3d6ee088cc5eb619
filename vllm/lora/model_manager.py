"""Adapters on one model: wrapping layers, GPU slots, the CPU cache.

- Wrapping: every linear layer and every FusedMoE layer of the model is
  replaced by its LoRA wrapper once, at start-up.
- GPU slots: ``max_loras`` slots of stacked factors in every wrapped layer.
  A step activates the adapters its tokens use; an adapter that is not in a
  slot takes a free slot or the least recently used one not needed now.
- CPU cache: up to ``max_cpu_loras`` parsed adapters (LRU). An adapter
  evicted from it is re-read from disk when needed again.
- Each step: ``prepare_step`` maps every token to its slot (-1 for none),
  updates the punica wrapper and calls ``set_mapping`` on every layer.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from vllm.config import LoRAConfig
from vllm.logger import init_logger
from vllm.lora.layers.base import BaseLayerWithLoRA
from vllm.lora.layers.fused_moe import FusedMoE3DWithLoRA, FusedMoEWithLoRA
from vllm.lora.layers.linear import LinearWithLoRA
from vllm.lora.peft import LinearTarget, LoRAAdapter, LoRAError, MoETarget, read_peft_adapter
from vllm.lora.punica_wrapper.base import LayerSelection, PunicaWrapperBase
from vllm.lora.request import LoRARequest
from vllm.model_executor.layers.fused_moe.layer import FusedMoE
from vllm.model_executor.layers.linear import LinearBase

logger = init_logger(__name__)


def make_punica_wrapper(max_loras: int, device: torch.device,
                        max_num_tokens: int) -> PunicaWrapperBase:
    if device.type == "cuda":
        from vllm.lora.punica_wrapper.triton_wrapper import TritonPunicaWrapper
        return TritonPunicaWrapper(max_loras, device, max_num_tokens)
    from vllm.lora.punica_wrapper.torch_wrapper import TorchPunicaWrapper
    return TorchPunicaWrapper(max_loras, device, max_num_tokens)


class LoRAModelManager:
    def __init__(self, model: nn.Module, config: LoRAConfig, device: torch.device,
                 max_num_tokens: int = 0):
        self.model = model
        self.config = config
        self.device = device
        self.punica = make_punica_wrapper(config.max_loras, device, max_num_tokens)
        self.layers: dict[str, BaseLayerWithLoRA] = {}
        self._wrap(model)
        self.linear_targets, self.moe_targets = self._targets()
        self.slot_adapter: list[int | None] = [None] * config.max_loras
        self._slot_clock = [0] * config.max_loras
        self._clock = 0
        # whether every layer was last told that no adapter is active
        self._layers_idle = False
        self._slot_layers: frozenset[str] | None = None
        self.cpu_cache: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self.registered: dict[int, LoRARequest] = {}

    # -- wrapping -------------------------------------------------------------------
    def _wrap(self, model: nn.Module) -> None:
        fused_3d = getattr(model, "moe_lora_fused_w13", False)
        for name, module in list(model.named_modules()):
            if isinstance(module, FusedMoE):
                wrapper = (FusedMoE3DWithLoRA if fused_3d else FusedMoEWithLoRA)(module)
            elif isinstance(module, LinearBase):
                wrapper = LinearWithLoRA(module)
            else:
                continue
            wrapper.create_lora_weights(self.config.max_loras, self.config, self.device)
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, wrapper)
            self.layers[name] = wrapper

    def _targets(self) -> tuple[dict[str, LinearTarget], dict[str, MoETarget]]:
        packed = getattr(self.model, "packed_modules_mapping", {})
        out_in = getattr(self.model, "experts_out_in_layout", True)
        linear, moe = {}, {}
        for name, layer in self.layers.items():
            base = layer.base_layer
            if isinstance(base, FusedMoE):
                cfg = base.moe_config
                moe[name] = MoETarget(name, cfg.num_experts, cfg.hidden_size,
                                      cfg.intermediate_size * cfg.tp_size, out_in)
                continue
            prefix, _, leaf = name.rpartition(".")
            subs = packed.get(leaf, [leaf])
            if len(subs) != len(base.output_sizes):
                subs = [leaf]
            for i, sub in enumerate(subs):
                linear[f"{prefix}.{sub}" if prefix else sub] = LinearTarget(
                    name, i, base.input_size, base.output_sizes[i])
        return linear, moe

    # -- adapters -------------------------------------------------------------------
    def load_adapter(self, request: LoRARequest) -> LoRAAdapter:
        """Parse and validate an adapter (or take it from the CPU cache)."""
        known = self.registered.get(request.lora_int_id)
        if known is not None and known.lora_path != request.lora_path:
            raise LoRAError(f"adapter id {request.lora_int_id} is already used by "
                            f"{known.lora_name!r} ({known.lora_path})")
        if request.lora_int_id in self.cpu_cache:
            self.cpu_cache.move_to_end(request.lora_int_id)
            return self.cpu_cache[request.lora_int_id]
        adapter = read_peft_adapter(
            request.lora_name, request.lora_int_id, request.lora_path,
            linear_targets=self.linear_targets, moe_targets=self.moe_targets,
            expert_shards=getattr(self.model, "expert_shards", {}),
            rename=self.model.rename_checkpoint_key, max_rank=self.config.max_lora_rank)
        for name, layer in self.layers.items():
            layer.check_lora(self._layer_weights(adapter, name, layer))
        self.registered[request.lora_int_id] = request
        self.cpu_cache[request.lora_int_id] = adapter
        while len(self.cpu_cache) > self.config.max_cpu_loras:
            evicted, _ = self.cpu_cache.popitem(last=False)
            logger.debug("evicted adapter %d from the CPU cache", evicted)
        return adapter

    def remove_adapter(self, lora_int_id: int) -> bool:
        self.cpu_cache.pop(lora_int_id, None)
        found = self.registered.pop(lora_int_id, None) is not None
        for slot, held in enumerate(self.slot_adapter):
            if held == lora_int_id:
                for layer in self.layers.values():
                    layer.reset_lora(slot)
                self.slot_adapter[slot] = None
                self._slot_layers = None
        return found

    @property
    def slot_layers(self) -> frozenset[str]:
        """The LoRA layers some adapter in a slot has weights for."""
        if self._slot_layers is None:
            self._slot_layers = frozenset(name for name, layer in self.layers.items()
                                          if layer.slots_with_weights)
        return self._slot_layers

    def _activate(self, lora_int_id: int, needed: set[int]) -> int:
        if lora_int_id in self.slot_adapter:
            return self.slot_adapter.index(lora_int_id)
        free = [s for s, held in enumerate(self.slot_adapter) if held is None]
        if free:
            slot = free[0]
        else:
            evictable = [s for s, held in enumerate(self.slot_adapter) if held not in needed]
            if not evictable:
                raise RuntimeError("more adapters in one step than --max-loras slots")
            slot = min(evictable, key=lambda s: self._slot_clock[s])
        request = self.registered.get(lora_int_id)
        if request is None:
            raise LoRAError(f"adapter id {lora_int_id} was never loaded")
        adapter = self.load_adapter(request)
        for name, layer in self.layers.items():
            layer.set_lora(slot, self._layer_weights(adapter, name, layer))
        self.slot_adapter[slot] = lora_int_id
        self._slot_layers = None
        return slot

    def _layer_weights(self, adapter: LoRAAdapter, name: str, layer: BaseLayerWithLoRA) -> Any:
        if isinstance(layer, FusedMoEWithLoRA):
            return adapter.moe.get(name)
        return [adapter.linear.get((name, i))
                for i in range(len(layer.base_layer.output_sizes))]

    def prepare_step(self, token_lora_ids: list[int]) -> None:
        """Put this step's adapters in slots and publish the token -> slot map."""
        needed = set(token_lora_ids) - {0}
        slot_of = {}
        for lora_id in sorted(needed):
            slot_of[lora_id] = self._activate(lora_id, needed)
        self._clock += 1
        for slot in slot_of.values():
            self._slot_clock[slot] = self._clock
        self.punica.update_mapping([slot_of.get(i, -1) for i in token_lora_ids])
        idle = not slot_of and self.punica.layer_selection is LayerSelection.STEP
        if idle and self._layers_idle:
            return  # base-only after base-only: every layer already runs without LoRA
        for layer in self.layers.values():
            layer.set_mapping(self.punica)
        self._layers_idle = idle
