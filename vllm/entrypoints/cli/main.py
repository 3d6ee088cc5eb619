"""The ``vllm`` command."""
from __future__ import annotations

import argparse

from vllm.entrypoints.cli.serve import add_serve_parser
from vllm.version import __version__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="vllm", description="A vLLM-compatible engine for serving many LoRA adapters "
                                 "on Mixture-of-Experts models.")
    parser.add_argument("-v", "--version", action="version", version=__version__)
    subparsers = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    add_serve_parser(subparsers)
    args = parser.parse_args(argv)
    if args.subcommand is None:
        parser.print_help()
        parser.exit(2)
    args.dispatch(args)


if __name__ == "__main__":
    main()
