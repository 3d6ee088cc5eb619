"""POST /v1/completions: one engine request per prompt, ``n`` choices each."""
from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from vllm.engine.async_engine import GenerationRequest, RequestStream
from vllm.entrypoints.openai.errors import APIError
from vllm.entrypoints.openai.protocol import (CompletionLogProbs, CompletionRequest,
                                              CompletionResponse, CompletionResponseChoice,
                                              CompletionStreamResponse, UsageInfo, random_id)
from vllm.entrypoints.openai.serving_engine import ChoiceStream, OpenAIServing, clamp_logprob, sse
from vllm.outputs import Logprob, RequestOutput

_Prompt = tuple[str | None, list[int]]  # text (None for token-id prompts), token ids


class OpenAIServingCompletion(OpenAIServing):
    """Handles text completions, streamed or not."""

    async def create_completion(self, request: CompletionRequest
                                ) -> CompletionResponse | StreamingResponse:
        if request.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        lora = self.models.resolve(request.model)
        prompts = self._prompts(request)
        request_id = random_id("cmpl")
        # echo with logprobs reports the prompt tokens' logprobs too
        prompt_logprobs = request.logprobs if request.echo else None
        engine_requests = []
        for i, (text, ids) in enumerate(prompts):
            prompt = {"prompt_token_ids": ids} if text is None else \
                {"prompt": text, "prompt_token_ids": ids}
            params = self.sampling_params(request, request.max_tokens, request.logprobs,
                                          prompt_logprobs)
            engine_requests.append(GenerationRequest(f"{request_id}-{i}", prompt, params, lora))
        stream = await self.start(engine_requests)
        model = request.model or self.models.base_model_name
        if request.stream:
            return self.sse_response(stream, self._chunks(request, request_id, model, prompts,
                                                          stream, params.stop))
        finals = await self.collect(stream)
        return self._response(request, request_id, model, prompts,
                              [finals[rid] for rid in stream.request_ids])

    def _prompts(self, request: CompletionRequest) -> list[_Prompt]:
        prompt = request.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return [(p, self.tokenizer.encode(p)) if isinstance(p, str) else (None, list(p))
                for p in items]

    def _prompt_text(self, prompt: _Prompt) -> str:
        text, ids = prompt
        return text if text is not None else self.tokenizer.decode(ids)

    def _logprobs(self, token_ids: list[int], entries: list[dict[int, Logprob] | None],
                  offset: int) -> CompletionLogProbs:
        """OpenAI's completion logprobs; ``offset`` is the text position of the
        first token. A None entry (the first prompt token) has no logprob."""
        result = CompletionLogProbs()
        for token_id, entry in zip(token_ids, entries):
            if entry is None:
                token, logprob, top = self.token_text(token_id), None, None
            else:
                chosen = entry[token_id]
                token = chosen.decoded_token or ""
                logprob = clamp_logprob(chosen.logprob)
                top = {(e.decoded_token or ""): clamp_logprob(e.logprob) for e in entry.values()}
            result.tokens.append(token)
            result.token_logprobs.append(logprob)
            result.top_logprobs.append(top)
            result.text_offset.append(offset)
            offset += len(token)
        return result

    def _response(self, request: CompletionRequest, request_id: str, model: str,
                  prompts: list[_Prompt], finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        usage = UsageInfo()
        for i, (prompt, out) in enumerate(zip(prompts, finals)):
            usage.prompt_tokens += len(out.prompt_token_ids)
            prefix = self._prompt_text(prompt) if request.echo else ""
            for c in out.outputs:
                usage.completion_tokens += len(c.token_ids)
                logprobs = None
                if request.logprobs is not None:
                    if request.echo:
                        logprobs = self._logprobs(out.prompt_token_ids + c.token_ids,
                                                  (out.prompt_logprobs or []) + c.logprobs, 0)
                    else:
                        logprobs = self._logprobs(c.token_ids, c.logprobs, 0)
                choices.append(CompletionResponseChoice(
                    index=i * request.n + c.index, text=prefix + c.text, logprobs=logprobs,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return CompletionResponse(id=request_id, model=model, choices=choices, usage=usage)

    async def _chunks(self, request: CompletionRequest, request_id: str, model: str,
                      prompts: list[_Prompt], stream: RequestStream,
                      stop: list[str]) -> AsyncIterator[str]:
        prompt_index = {rid: i for i, rid in enumerate(stream.request_ids)}
        choices: dict[tuple[int, int], ChoiceStream] = {}
        text_offsets: dict[tuple[int, int], int] = {}
        prompt_tokens: dict[int, int] = {}
        completion_tokens: dict[tuple[int, int], int] = {}
        async for out in stream:
            i = prompt_index[out.request_id]
            prompt_tokens[i] = len(out.prompt_token_ids)
            for c in out.outputs:
                key = (i, c.index)
                choice = choices.setdefault(key, ChoiceStream(stop))
                if choice.finished:
                    continue
                completion_tokens[key] = len(c.token_ids)
                text, new_tokens = choice.advance(c)
                entries = c.logprobs[len(c.token_ids) - len(new_tokens):] if c.logprobs else []
                if not choice.started:
                    choice.started = True
                    if request.echo:
                        text = self._prompt_text(prompts[i]) + text
                        new_tokens = out.prompt_token_ids + new_tokens
                        entries = (out.prompt_logprobs or []) + entries
                wants_logprobs = request.logprobs is not None and new_tokens
                if not text and not wants_logprobs and not choice.finished:
                    continue
                logprobs = None
                if request.logprobs is not None:
                    logprobs = self._logprobs(new_tokens, entries, text_offsets.get(key, 0))
                    if logprobs.tokens:
                        text_offsets[key] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                yield sse(CompletionStreamResponse(id=request_id, model=model, choices=[
                    CompletionResponseChoice(
                        index=i * request.n + c.index, text=text, logprobs=logprobs,
                        finish_reason=c.finish_reason if choice.finished else None,
                        stop_reason=c.stop_reason if choice.finished else None)]))
        if request.include_usage:
            usage = UsageInfo(prompt_tokens=sum(prompt_tokens.values()),
                              completion_tokens=sum(completion_tokens.values()))
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            yield sse(CompletionStreamResponse(id=request_id, model=model, choices=[],
                                               usage=usage))
