"""The offline ``LLM`` class: batch generation and chat on one engine."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from tqdm import tqdm

from vllm.engine.arg_utils import EngineArgs
from vllm.engine.llm_engine import LLMEngine, PromptType
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """Generate from a local Hugging Face MoE checkpoint.

    Keyword arguments are ``EngineArgs`` fields (``enable_lora=True``,
    ``max_loras=4``, ``dtype="float32"``, ...)."""

    def __init__(self, model: str, tokenizer: str | None = None, dtype: str = "auto",
                 seed: int = 0, **kwargs: Any):
        self.engine_args = EngineArgs(model=model, tokenizer=tokenizer, dtype=dtype, seed=seed,
                                      **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._ids = itertools.count()

    def __del__(self):
        engine = getattr(self, "llm_engine", None)
        if engine is not None:
            engine.shutdown()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None
                 ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in prompt order. A prompt is a
        string, a list of token ids, or ``{"prompt_token_ids": [...]}``;
        ``sampling_params`` and ``lora_request`` are one for all prompts or
        one per prompt."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = _per_prompt(sampling_params or SamplingParams(), len(prompts), "sampling_params")
        loras = _per_prompt(lora_request, len(prompts), "lora_request")
        return self._run(prompts, params, loras, use_tqdm)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True
             ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.get_tokenizer()
        prompts = [tokenizer.apply_chat_template(conv, tokenize=False, chat_template=chat_template,
                                                 add_generation_prompt=add_generation_prompt)
                   for conv in conversations]
        # the template already holds any special tokens: do not add them again
        prompts = [{"prompt": p, "prompt_token_ids": tokenizer.encode(p, add_special_tokens=False)}
                   for p in prompts]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def _run(self, prompts: list[PromptType], params: list[SamplingParams],
             loras: list[LoRARequest | None], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = []
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                rid = str(next(self._ids))
                engine.add_request(rid, prompt, replace(p, output_kind=RequestOutputKind.FINAL_ONLY),
                                   lora)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)  # all or nothing: the engine stays clean
            raise
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        except BaseException:
            engine.abort_request([i for i in ids if i not in finished])
            raise
        finally:
            bar.close()
        return [finished[i] for i in ids]


def _per_prompt(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n
