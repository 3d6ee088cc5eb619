"""The OpenAI-compatible HTTP server (FastAPI app, start-up, uvicorn).

Errors always use OpenAI's JSON shape; request validation errors are 400
(not FastAPI's 422). When an API key is set, every /v1 route needs
``Authorization: Bearer <key>``; /health, /version and /metrics stay open.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import jinja2
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from vllm import envs
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.async_engine import AsyncLLMEngine, EngineDeadError
from vllm.engine.llm_engine import LLMEngine
from vllm.engine.metrics import EngineMetrics
from vllm.entrypoints.openai.errors import APIError, to_api_error
from vllm.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest,
                                              LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest)
from vllm.entrypoints.openai.serving_chat import OpenAIServingChat
from vllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from vllm.entrypoints.openai.serving_models import OpenAIServingModels
from vllm.logger import init_logger
from vllm.version import __version__

logger = init_logger(__name__)


class StartupError(RuntimeError):
    """The server cannot start (bad adapter, bad chat template, ...)."""


@dataclass
class ServerComponents:
    """Everything the routes use."""
    engine: AsyncLLMEngine
    models: OpenAIServingModels
    completion: OpenAIServingCompletion
    chat: OpenAIServingChat
    registry: CollectorRegistry


class APIKeyMiddleware:
    """Plain ASGI (not BaseHTTPMiddleware, which would sit between a
    streaming response and the client's disconnect)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") \
                and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                await APIError(401, "Unauthorized: a valid API key is required")\
                    .response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _unless_disconnected(raw_request: Request, handler: Awaitable[Any]) -> Response:
    """Run a generation handler, cancelling it (which aborts its requests) if
    the client disconnects before the response starts. Streaming responses
    notice later disconnects themselves."""
    async def disconnected() -> None:
        while (await raw_request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(handler)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        work.cancel()  # no-op once done
    if not work.done() or work.cancelled():
        return Response(status_code=499)  # nobody is listening any more
    result = work.result()
    return result if isinstance(result, Response) else JSONResponse(result.model_dump())


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON: {error.get('ctx', {}).get('error')}")
            continue
        loc = [str(x) for x in error.get("loc", ()) if x != "body"]
        param = param or (loc[0] if loc else None)
        message = str(error.get("msg")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {message}" if loc else message)
    return "; ".join(parts) or "invalid request", param


def build_app(components: ServerComponents, api_key: str | None = None,
              allow_runtime_lora: bool = False) -> FastAPI:
    app = FastAPI(title="vLLM-compatible OpenAI API", version=__version__)
    c = components

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(400, message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    # Exception: a bug still answers in OpenAI's shape (uvicorn logs the traceback)
    @app.exception_handler(Exception)
    @app.exception_handler(APIError)
    @app.exception_handler(ValueError)
    @app.exception_handler(EngineDeadError)
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    @app.get("/health")
    async def health() -> Response:
        if not c.engine.is_running:
            return APIError(503, str(c.engine.dead_error)).response()
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(c.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(c.models.list_models().model_dump())

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw_request: Request) -> Response:
        return await _unless_disconnected(raw_request,
                                          c.completion.create_completion(request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await _unless_disconnected(raw_request,
                                          c.chat.create_chat_completion(request))

    if allow_runtime_lora:
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: LoadLoRAAdapterRequest) -> Response:
            await c.models.load_lora(request.lora_name, request.lora_path)
            return PlainTextResponse(
                f"Success: LoRA adapter '{request.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: UnloadLoRAAdapterRequest) -> Response:
            await c.models.unload_lora(request.lora_name)
            return PlainTextResponse(
                f"Success: LoRA adapter '{request.lora_name}' removed successfully.")

    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file path, or the template itself (inline Jinja)."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            template = f.read()
    elif any(c in value for c in "{}\n"):
        template = value
    else:
        raise StartupError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise StartupError(f"--chat-template does not parse: {e}") from e
    return template


def create_components(llm_engine: LLMEngine, served_model_names: list[str] | None = None,
                      chat_template: str | None = None) -> ServerComponents:
    """Start the engine thread around ``llm_engine`` and build the handlers."""
    from transformers import AutoTokenizer

    config = llm_engine.config
    mc = config.model_config
    registry = CollectorRegistry()
    engine = AsyncLLMEngine(llm_engine, EngineMetrics(registry, mc.served_model_name))
    models = OpenAIServingModels(engine, served_model_names or [mc.served_model_name], mc.model,
                                 mc.max_model_len)
    # the frontend's own tokenizer: the engine's belongs to the engine thread
    tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer)
    completion = OpenAIServingCompletion(engine, models, tokenizer, config)
    chat = OpenAIServingChat(engine, models, tokenizer, config, chat_template)
    return ServerComponents(engine, models, completion, chat, registry)


async def build_components(args: argparse.Namespace) -> ServerComponents:
    """Load the model, start the engine and load ``--lora-modules`` (each
    validated now: a bad one raises StartupError naming it)."""
    chat_template = load_chat_template(args.chat_template)
    config = EngineArgs.from_cli_args(args).create_engine_config()
    components = create_components(LLMEngine(config), args.served_model_name, chat_template)
    try:
        await components.models.load_static_loras(args.lora_modules or [])
    except APIError as e:
        components.engine.shutdown()
        raise StartupError(e.message) from e
    return components


async def serve(args: argparse.Namespace) -> None:
    components = await build_components(args)
    api_key = args.api_key or envs.VLLM_API_KEY
    runtime_lora = envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING
    app = build_app(components, api_key, runtime_lora)
    logger.info("serving %s with adapters [%s]; API key %s; runtime adapter loading %s",
                ", ".join(components.models.served_model_names),
                ", ".join(components.models.loras), "required" if api_key else "off",
                "on" if runtime_lora else "off")
    config = uvicorn.Config(app, host=args.host, port=args.port,
                            log_level=args.uvicorn_log_level,
                            access_log=not args.disable_uvicorn_access_log)
    try:
        await uvicorn.Server(config).serve()
    finally:
        components.engine.shutdown()


def run_server(args: argparse.Namespace) -> None:
    asyncio.run(serve(args))
