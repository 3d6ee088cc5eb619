"""POST /v1/chat/completions: messages rendered by a chat template, then generated."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import jinja2
from fastapi.responses import StreamingResponse

from vllm.config import VllmConfig
from vllm.engine.async_engine import AsyncLLMEngine, GenerationRequest, RequestStream
from vllm.entrypoints.openai.errors import APIError
from vllm.entrypoints.openai.protocol import (ChatCompletionLogProb, ChatCompletionLogProbs,
                                              ChatCompletionLogProbsContent,
                                              ChatCompletionRequest, ChatCompletionResponse,
                                              ChatCompletionResponseChoice,
                                              ChatCompletionResponseStreamChoice,
                                              ChatCompletionStreamResponse, ChatResponseMessage,
                                              DeltaMessage, UsageInfo, random_id)
from vllm.entrypoints.openai.serving_engine import ChoiceStream, OpenAIServing, clamp_logprob, sse
from vllm.entrypoints.openai.serving_models import OpenAIServingModels
from vllm.outputs import Logprob

_ROLE = "assistant"


def _logprob(entry: Logprob) -> ChatCompletionLogProb:
    token = entry.decoded_token or ""
    return ChatCompletionLogProb(token=token, logprob=clamp_logprob(entry.logprob),
                                 bytes=list(token.encode("utf-8")))


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]],
                  top_n: int) -> ChatCompletionLogProbs:
    """OpenAI's chat logprobs: each token with its ``top_n`` most likely alternatives."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        top = sorted((e for e in entry.values() if e.rank is not None and e.rank <= top_n),
                     key=lambda e: e.rank)[:top_n]
        chosen = _logprob(entry[token_id])
        content.append(ChatCompletionLogProbsContent(**chosen.model_dump(),
                                                     top_logprobs=[_logprob(e) for e in top]))
    return ChatCompletionLogProbs(content=content)


class OpenAIServingChat(OpenAIServing):
    """Handles chat completions, streamed or not. ``chat_template`` (the
    server's ``--chat-template``) overrides the tokenizer's template."""

    def __init__(self, engine: AsyncLLMEngine, models: OpenAIServingModels, tokenizer: Any,
                 config: VllmConfig, chat_template: str | None = None):
        super().__init__(engine, models, tokenizer, config)
        self.chat_template = chat_template

    async def create_chat_completion(self, request: ChatCompletionRequest
                                     ) -> ChatCompletionResponse | StreamingResponse:
        lora = self.models.resolve(request.model)
        text, ids = self._render(request)
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None \
            else request.max_tokens
        top_n = request.top_logprobs or 0
        params = self.sampling_params(request, max_tokens, top_n if request.logprobs else None)
        request_id = random_id("chatcmpl")
        stream = await self.start([GenerationRequest(
            request_id, {"prompt": text, "prompt_token_ids": ids}, params, lora)])
        model = request.model or self.models.base_model_name
        if request.stream:
            return self.sse_response(stream, self._chunks(request, request_id, model, stream,
                                                          params.stop))
        out = (await self.collect(stream))[request_id]
        choices = [ChatCompletionResponseChoice(
            index=c.index, message=ChatResponseMessage(role=_ROLE, content=c.text),
            logprobs=chat_logprobs(c.token_ids, c.logprobs, top_n) if request.logprobs else None,
            finish_reason=c.finish_reason, stop_reason=c.stop_reason) for c in out.outputs]
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        usage = UsageInfo(prompt_tokens=len(ids), completion_tokens=completion_tokens,
                          total_tokens=len(ids) + completion_tokens)
        return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage)

    def _render(self, request: ChatCompletionRequest) -> tuple[str, list[int]]:
        """The prompt text and its token ids (the template already holds any
        special tokens, so the tokenizer adds none)."""
        messages = []
        for message in request.messages:
            item = message.model_dump(exclude_none=True)
            if isinstance(message.content, list):
                item["content"] = self._text_of(message.content)
            messages.append(item)
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=request.add_generation_prompt,
                chat_template=request.chat_template or self.chat_template)
        except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from e
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    @staticmethod
    def _text_of(parts: list[dict[str, Any]]) -> str:
        texts = []
        for part in parts:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"unsupported content part of type {part.get('type')!r}; "
                                    "only text parts are supported", param="messages")
            texts.append(part["text"])
        return "\n".join(texts)

    async def _chunks(self, request: ChatCompletionRequest, request_id: str, model: str,
                      stream: RequestStream, stop: list[str]) -> AsyncIterator[str]:
        def chunk(index: int, delta: DeltaMessage, logprobs: ChatCompletionLogProbs | None = None,
                  finish_reason: str | None = None, stop_reason: int | str | None = None) -> str:
            return sse(ChatCompletionStreamResponse(id=request_id, model=model, choices=[
                ChatCompletionResponseStreamChoice(index=index, delta=delta, logprobs=logprobs,
                                                   finish_reason=finish_reason,
                                                   stop_reason=stop_reason)]))

        for index in range(request.n):
            yield chunk(index, DeltaMessage(role=_ROLE, content=""))
        choices = [ChoiceStream(stop) for _ in range(request.n)]
        prompt_tokens = completion_tokens = 0
        top_n = request.top_logprobs or 0
        async for out in stream:
            prompt_tokens = len(out.prompt_token_ids)
            completion_tokens = sum(len(c.token_ids) for c in out.outputs)
            for c in out.outputs:
                choice = choices[c.index]
                if choice.finished:
                    continue
                text, new_tokens = choice.advance(c)
                if not text and not choice.finished and not (request.logprobs and new_tokens):
                    continue
                logprobs = None
                if request.logprobs:
                    entries = c.logprobs[len(c.token_ids) - len(new_tokens):]
                    logprobs = chat_logprobs(new_tokens, entries, top_n)
                delta = DeltaMessage(content=text) if text or not choice.finished \
                    else DeltaMessage()
                yield chunk(c.index, delta, logprobs,
                            c.finish_reason if choice.finished else None,
                            c.stop_reason if choice.finished else None)
        if request.include_usage:
            yield sse(ChatCompletionStreamResponse(
                id=request_id, model=model, choices=[],
                usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                total_tokens=prompt_tokens + completion_tokens)))
