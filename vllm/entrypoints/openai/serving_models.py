"""The models a server answers to: the base model's served names and the
LoRA adapters (given at start-up or loaded at run time), by name."""
from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

from vllm.engine.async_engine import AsyncLLMEngine
from vllm.entrypoints.openai.protocol import ModelCard, ModelList
from vllm.entrypoints.openai.errors import APIError
from vllm.lora.request import LoRARequest


@dataclass
class LoRAModulePath:
    """One ``--lora-modules`` entry."""
    name: str
    path: str
    base_model_name: str | None = None


class OpenAIServingModels:
    """Resolves the ``model`` field of requests and owns the adapter registry.

    Adapter ids are never reused, so an adapter unloaded and loaded again
    (maybe from another path) is a new adapter to the engine."""

    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str], model_path: str,
                 max_model_len: int):
        self.engine = engine
        self.served_model_names = served_model_names
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.loras: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)
        # a load awaits the engine; two loads of one name must not interleave
        self._lock = asyncio.Lock()

    @property
    def base_model_name(self) -> str:
        return self.served_model_names[0]

    def resolve(self, model: str | None) -> LoRARequest | None:
        """The adapter a request's ``model`` names (None for the base model).

        Callers must hand the result to the engine (``AsyncLLMEngine``'s add,
        which enqueues before it awaits) with no ``await`` in between: the
        engine thread runs commands in order, so a request that resolved an
        adapter is in the engine before any later unload of that adapter,
        which the engine then refuses while the request runs."""
        if model is None or model in self.served_model_names:
            return None
        lora = self.loras.get(model)
        if lora is None:
            raise APIError(404, f"The model `{model}` does not exist.", param="model")
        return lora

    def list_models(self) -> ModelList:
        cards = [ModelCard(id=name, root=self.model_path, max_model_len=self.max_model_len)
                 for name in self.served_model_names]
        cards += [ModelCard(id=lora.lora_name, root=lora.lora_path,
                            parent=lora.base_model_name or self.base_model_name,
                            max_model_len=self.max_model_len)
                  for lora in self.loras.values()]
        return ModelList(data=cards)

    async def load_lora(self, name: str, path: str, base_model_name: str | None = None) -> None:
        """Validate and register an adapter; APIError(400) with the reason
        when the name is taken or the adapter cannot be served."""
        async with self._lock:
            if name in self.loras or name in self.served_model_names:
                raise APIError(400, f"The lora adapter '{name}' has already been loaded.",
                               param="lora_name")
            if not path:
                raise APIError(400, "lora_path must not be empty", param="lora_path")
            lora = LoRARequest(name, next(self._ids), path, base_model_name)
            try:
                await self.engine.add_lora(lora)
            except ValueError as e:  # LoRAError and InvalidRequestError
                raise APIError(400, f"cannot load LoRA adapter '{name}' from {path}: {e}",
                               param="lora_path") from e
            self.loras[name] = lora

    async def unload_lora(self, name: str) -> None:
        async with self._lock:
            lora = self.loras.get(name)
            if lora is None:
                raise APIError(404, f"The lora adapter '{name}' cannot be found.",
                               param="lora_name")
            try:
                await self.engine.remove_lora(lora.lora_int_id)
            except ValueError as e:  # still in use by unfinished requests
                raise APIError(400, f"cannot unload LoRA adapter '{name}': {e}",
                               param="lora_name") from e
            del self.loras[name]

    async def load_static_loras(self, modules: list[LoRAModulePath]) -> None:
        """Load the ``--lora-modules`` adapters; the first bad one raises APIError."""
        for module in modules:
            await self.load_lora(module.name, module.path, module.base_model_name)
