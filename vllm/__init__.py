"""A vLLM-compatible inference engine built for serving many LoRA adapters
on Mixture-of-Experts models."""
from vllm.version import __version__

__all__ = ["LLM", "SamplingParams", "LoRARequest", "EngineArgs", "RequestOutput",
           "CompletionOutput", "__version__"]


def __getattr__(name: str):
    # Lazy imports keep `import vllm` (and the CLI's --help) fast.
    if name == "LLM":
        from vllm.entrypoints.llm import LLM
        return LLM
    if name == "SamplingParams":
        from vllm.sampling_params import SamplingParams
        return SamplingParams
    if name == "LoRARequest":
        from vllm.lora.request import LoRARequest
        return LoRARequest
    if name == "EngineArgs":
        from vllm.engine.arg_utils import EngineArgs
        return EngineArgs
    if name in ("RequestOutput", "CompletionOutput"):
        import vllm.outputs as outputs
        return getattr(outputs, name)
    raise AttributeError(f"module 'vllm' has no attribute {name!r}")
