"""What Triton can do in this process (it is optional on the CPU)."""
import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _device_supports_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def supports_pdl(device: torch.device) -> bool:
    """Whether kernels on ``device`` can use programmatic dependent launch
    (``launch_pdl``, ``gdc_wait``): CUDA devices from Hopper on, and never
    under the Triton interpreter, which cannot run those instructions."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _device_supports_pdl(device.index if device.index is not None
                                else torch.cuda.current_device())
