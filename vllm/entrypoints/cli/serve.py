"""``vllm serve MODEL``: the OpenAI-compatible server's command line."""
from __future__ import annotations

import argparse
import json
import sys

from vllm.engine.arg_utils import EngineArgs
from vllm.entrypoints.openai.serving_models import LoRAModulePath


def parse_lora_module(value: str) -> LoRAModulePath:
    """One ``--lora-modules`` item: ``name=path`` or
    ``{"name": ..., "path": ..., "base_model_name": ...}``."""
    value = value.strip()
    if value.startswith("{"):
        try:
            item = json.loads(value)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"invalid JSON {value!r}: {e}") from e
        if not isinstance(item.get("name"), str) or not isinstance(item.get("path"), str) \
                or not item["name"] or not item["path"]:
            raise argparse.ArgumentTypeError(
                f"{value!r} needs non-empty string fields \"name\" and \"path\"")
        base = item.get("base_model_name")
        if base is not None and not isinstance(base, str):
            raise argparse.ArgumentTypeError(f"{value!r}: base_model_name must be a string")
        return LoRAModulePath(item["name"], item["path"], base)
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected name=path or a JSON object, got {value!r}")
    return LoRAModulePath(name, path)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", help="start the OpenAI-compatible API server",
        description="Serve a model (and LoRA adapters) over an OpenAI-compatible HTTP API.")
    parser.add_argument("model_tag", nargs="?", default=None,
                        help="model directory (or give --model)")
    parser.add_argument("--model", type=str, default=None, help="model directory")
    parser.add_argument("--host", type=str, default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", type=str, default=None,
                        help="require this key (Authorization: Bearer KEY) on /v1 routes; "
                             "default: $VLLM_API_KEY")
    parser.add_argument("--lora-modules", type=parse_lora_module, nargs="+", default=None,
                        metavar="NAME=PATH|JSON",
                        help='adapters to serve: name=path items or JSON objects '
                             '{"name": ..., "path": ..., "base_model_name": ...}; '
                             "needs --enable-lora")
    parser.add_argument("--chat-template", type=str, default=None,
                        help="chat template file, or the template itself (Jinja); default: "
                             "the tokenizer's")
    parser.add_argument("--uvicorn-log-level", type=str, default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    parser.add_argument("--disable-uvicorn-access-log", action="store_true",
                        help="do not log every HTTP request")
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(dispatch=lambda args: run_serve(args, parser))
    return parser


def run_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    args.model = args.model_tag or args.model
    if not args.model:
        parser.error("a model is required: vllm serve MODEL")
    if args.lora_modules and not args.enable_lora:
        parser.error("--lora-modules needs --enable-lora")

    from vllm.entrypoints.openai.api_server import StartupError, run_server
    try:
        run_server(args)
    except (StartupError, ValueError, OSError) as e:
        # configuration, model, adapter and template errors: a message, not a traceback
        print(f"vllm serve: error: {e}", file=sys.stderr)
        sys.exit(1)
