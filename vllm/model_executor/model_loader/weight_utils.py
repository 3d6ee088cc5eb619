"""Streaming tensors out of a Hugging Face checkpoint directory."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm


class MissingWeightsError(FileNotFoundError):
    pass


def checkpoint_files(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint: those named by
    ``model.safetensors.index.json`` when present, else every
    ``*.safetensors`` in the directory."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(model_dir, n))]
        if missing:
            raise MissingWeightsError(f"{model_dir}: weight files named in "
                                      f"model.safetensors.index.json are missing: {', '.join(missing)}")
    else:
        names = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not names:
        raise MissingWeightsError(f"{model_dir} has no *.safetensors weight files")
    return [os.path.join(model_dir, n) for n in names]


def iterate_safetensors(model_dir: str, progress: bool = True
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one tensor at a time, on the CPU."""
    files = checkpoint_files(model_dir)
    for path in tqdm(files, desc="Loading safetensors shards", disable=not progress or len(files) < 2):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
