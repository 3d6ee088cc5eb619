"""Build a model for a VllmConfig and load its checkpoint into it."""
from __future__ import annotations

import torch
from tqdm import tqdm

from vllm.model_executor.build_context import ModelBuildContext
from vllm.model_executor.model_loader.weight_utils import checkpoint_files, iterate_safetensors
from vllm.model_executor.models.moe_transformer import MoEForCausalLM
from vllm.model_executor.models.registry import model_class


def load_model(model_dir: str, architecture: str, ctx: ModelBuildContext,
               progress: bool = True) -> MoEForCausalLM:
    cls = model_class(architecture)
    checkpoint_files(model_dir)  # fail on missing files before building anything
    with torch.device(ctx.device):
        model = cls(ctx)
    weights = iterate_safetensors(model_dir, progress)
    if progress:
        weights = tqdm(weights, desc="Loading weights", unit=" tensors", leave=False)
    model.load_weights(weights)
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    return model.eval()
