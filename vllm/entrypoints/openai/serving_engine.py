"""What the completion and chat handlers share: building engine requests,
and server-sent-event streams that release only text that is final."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from vllm.config import VllmConfig
from vllm.engine.async_engine import AsyncLLMEngine, GenerationRequest, RequestStream
from vllm.engine.detokenizer import token_text
from vllm.entrypoints.openai.errors import APIError, to_api_error
from vllm.entrypoints.openai.protocol import SamplingRequest
from vllm.entrypoints.openai.serving_models import OpenAIServingModels
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams

SSE_DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def clamp_logprob(value: float) -> float:
    # JSON has no -inf; clamp like upstream does
    return max(value, -9999.0)


class ChoiceStream:
    """What has been streamed of one choice.

    The engine cuts a stop string (and anything after it) out of the text
    once it appears, and a stop string may begin in text an earlier token
    produced. So until the choice finishes, the last ``max(len(stop)) - 1``
    characters are held back: whatever is sent can no longer change, and
    the streamed text always equals the non-streamed text."""

    def __init__(self, stop: list[str]):
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text_sent = 0
        self.tokens_sent = 0
        self.started = False
        self.finished = False

    def advance(self, output: CompletionOutput) -> tuple[str, list[int]]:
        """The text that may be sent now and the tokens not yet reported."""
        self.finished = output.finish_reason is not None
        end = len(output.text) if self.finished else \
            max(self.text_sent, len(output.text) - self.holdback)
        text = output.text[self.text_sent:end]
        self.text_sent = end
        tokens = output.token_ids[self.tokens_sent:]
        self.tokens_sent = len(output.token_ids)
        return text, tokens


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator however the response ends. A client that
    disconnects while a chunk is being sent leaves the generator suspended
    at a ``yield``; closing it runs its ``finally``, which aborts the request
    now rather than whenever the generator is garbage-collected."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class OpenAIServing:
    """Base of the completion and chat handlers."""

    def __init__(self, engine: AsyncLLMEngine, models: OpenAIServingModels, tokenizer: Any,
                 config: VllmConfig):
        self.engine = engine
        self.models = models
        self.tokenizer = tokenizer
        self.max_n = config.scheduler_config.max_num_seqs

    def sampling_params(self, request: SamplingRequest, max_tokens: int | None,
                        logprobs: int | None, prompt_logprobs: int | None = None
                        ) -> SamplingParams:
        # every sample is a sequence of its own: bound them like a batch
        if request.n > self.max_n:
            raise APIError(400, f"n must be at most {self.max_n} (--max-num-seqs), "
                                f"got {request.n}", param="n")
        try:
            params = request.build_sampling_params(max_tokens, logprobs, prompt_logprobs)
        except ValueError as e:
            raise APIError(400, str(e)) from e
        return params

    async def start(self, requests: list[GenerationRequest]) -> RequestStream:
        try:
            return await self.engine.add_requests(requests)
        except Exception as e:
            raise to_api_error(e) from e

    def token_text(self, token_id: int) -> str:
        return token_text(self.tokenizer, token_id)

    @staticmethod
    async def collect(stream: RequestStream) -> dict[str, RequestOutput]:
        """The final output of every request of the stream."""
        finals: dict[str, RequestOutput] = {}
        try:
            async for output in stream:
                finals[output.request_id] = output
        finally:
            stream.close()
        return finals

    @staticmethod
    def sse_response(stream: RequestStream, chunks: AsyncIterator[str]) -> StreamingResponse:
        """Stream ``chunks`` as server-sent events, then ``[DONE]``. An error
        mid-stream becomes an error event; however the stream ends (a client
        disconnect included) its unfinished requests are aborted."""
        async def events() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield chunk
            except Exception as e:
                yield sse(to_api_error(e).body())
            finally:
                stream.close()
            yield SSE_DONE

        return _ClosingStreamingResponse(events(), media_type="text/event-stream")
