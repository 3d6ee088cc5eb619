"""ctypes bindings of the native MoE ops (csrc/): block alignment of routed
pairs (CPU and CUDA) and top-k routing (CUDA).

Libraries come from the package (built by setup.py at install time) or, in
a source checkout without them, are built on first use into a cache
directory keyed by a hash of the sources, so an edit never runs stale code.
Every function returns None when its library is unavailable; callers fall
back to Triton or torch (see ``moe_align.py`` and ``router.py``). CUDA ops
run on torch's current stream, so CUDA graphs capture them.
"""
from __future__ import annotations

import ctypes
import fcntl
import functools
import os

import torch

from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.moe_align import max_padded_pairs

logger = init_logger(__name__)

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_P = ctypes.c_void_p
_I32, _I64, _F32 = ctypes.c_int32, ctypes.c_int64, ctypes.c_float


@functools.lru_cache(maxsize=None)
def _library_dir() -> str | None:
    """Where the libraries are: next to the package when installed, else a
    cache directory built on demand from the checkout's sources."""
    from vllm.native_build import STAMP, build_native, source_hash
    digest = source_hash()
    stamp = os.path.join(_PKG_DIR, STAMP)
    if digest is None or (os.path.isfile(stamp) and open(stamp).read() == digest):
        return _PKG_DIR  # installed libraries, current with the sources (if any)
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                         "vllm", "native", digest)
    os.makedirs(cache, exist_ok=True)
    # the ranks of a parallel engine start together: one builds, the others
    # wait for it (the stamp is written last, once every library is in place)
    with open(os.path.join(cache, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(cache, STAMP)):
            try:
                build_native(cache, os.path.join(cache, "build"))
            except Exception as e:  # no compiler, no cmake: fall back quietly
                logger.info("native MoE ops unavailable (%s); using Triton/torch", e)
                return None
    return cache


@functools.lru_cache(maxsize=None)
def library(kind: str) -> ctypes.CDLL | None:
    """The native library for ``kind`` ("cpu" or "cuda"), or None."""
    directory = _library_dir()
    path = directory and os.path.join(directory, f"_vllm_native_{kind}.so")
    if not path or not os.path.isfile(path):
        return None
    lib = ctypes.CDLL(path)
    if kind == "cpu":
        lib.vllm_moe_align_cpu.argtypes = [_P, _I64, _I32, _P, _I32, _I32, _I32, _P, _I64, _P,
                                           _I64, _P]
    else:
        lib.vllm_moe_align_cuda.argtypes = [_P, _I64, _I32, _P, _I32, _I32, _I32, _P, _I64, _P,
                                            _I64, _P, _P, _I32, _P]
        lib.vllm_moe_align_cuda_workspace.argtypes = [_I64, _I32, _I32]
        lib.vllm_moe_align_cuda_workspace.restype = _I64
        lib.vllm_topk_route_cuda.argtypes = [_P, _I32, _I64, _I32, _I32, _I32, _I32, _F32, _P,
                                             _P, _I32, _P]
    return lib


MAX_CUDA_EXPERTS = 1024  # one thread per expert in the CUDA alignment's block


def available(device: torch.device, num_experts: int = 0) -> bool:
    if device.type == "cuda" and num_experts > MAX_CUDA_EXPERTS:
        return False
    return library("cuda" if device.type == "cuda" else "cpu") is not None


def _check(status: int, op: str) -> None:
    if status != 0:
        raise RuntimeError(f"native {op} failed with status {status}")


def moe_align(topk_ids: torch.Tensor, block_size: int, num_experts: int,
              token_lora_slot: torch.Tensor | None = None, max_loras: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``moe_align_block_size`` (or, with ``token_lora_slot``, the per-slot
    variant over ``max_loras`` slots), bit for bit; None without a library."""
    device = topk_ids.device
    lib = library("cuda" if device.type == "cuda" else "cpu")
    if lib is None:
        return None
    T, k = topk_ids.shape
    ids = topk_ids.to(torch.int32).contiguous()
    slots = None if token_lora_slot is None else token_lora_slot.to(torch.int32).contiguous()
    L = 1 if slots is None else max_loras
    P = max_padded_pairs(T * k, num_experts, block_size)
    sorted_ids = torch.empty(L, P, dtype=torch.int32, device=device)
    expert_ids = torch.empty(L, P // block_size, dtype=torch.int32, device=device)
    total = torch.empty(L, dtype=torch.int32, device=device)
    slot_ptr = slots.data_ptr() if slots is not None else None
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device).cuda_stream
        # large batches split the work over many blocks, which pass counts through it
        workspace = torch.empty(lib.vllm_moe_align_cuda_workspace(T * k, num_experts, L),
                                dtype=torch.int32, device=device)
        _check(lib.vllm_moe_align_cuda(ids.data_ptr(), T * k, k, slot_ptr, L, num_experts,
                                       block_size, sorted_ids.data_ptr(), P,
                                       expert_ids.data_ptr(), P // block_size, total.data_ptr(),
                                       workspace.data_ptr() if workspace.numel() else None,
                                       device.index, stream), "moe_align")
    else:
        for s in range(L):
            _check(lib.vllm_moe_align_cpu(ids.data_ptr(), T * k, k, slot_ptr, s, num_experts,
                                          block_size, sorted_ids[s].data_ptr(), P,
                                          expert_ids[s].data_ptr(), P // block_size,
                                          total[s:].data_ptr()), "moe_align")
    if slots is None:
        return sorted_ids[0], expert_ids[0], total
    return sorted_ids, expert_ids, total


_SCORING = {"softmax": 0, "sigmoid": 1, "topk_softmax": 2}
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def topk_route(router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool,
               scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One-launch routing on CUDA: (weights float32 [T, k], ids int32 [T, k]);
    None without a library or for inputs it does not cover."""
    lib = library("cuda") if router_logits.is_cuda else None
    T, E = router_logits.shape
    if lib is None or scoring not in _SCORING or router_logits.dtype not in _DTYPES \
            or E > 1024 or top_k > 32:
        return None
    logits = router_logits.contiguous()
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    stream = torch.cuda.current_stream(logits.device).cuda_stream
    _check(lib.vllm_topk_route_cuda(logits.data_ptr(), _DTYPES[logits.dtype], T, E, top_k,
                                    _SCORING[scoring], int(renormalize), scale,
                                    weights.data_ptr(), ids.data_ptr(), logits.device.index,
                                    stream), "topk_route")
    return weights, ids
