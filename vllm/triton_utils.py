"""Whether Triton is usable in this process (it is optional on the CPU)."""
import functools


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
