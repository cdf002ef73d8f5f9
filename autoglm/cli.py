"""`autoglm` command line: a thin argparse frame; every subcommand lives in `autoglm/commands/<name>.py`.

A command module that is not there yet is skipped (debug-logged), so commands can be added without editing this file
beyond the `COMMANDS` table.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from autoglm import __version__
from autoglm.errors import AutoGLMError

COMMANDS: tuple[str, ...] = ("serve", "chat", "inspect", "convert", "quantize", "bench", "plan", "prune")

log = logging.getLogger("autoglm.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoglm",
        description="Offline inference for AutoGLM-Phone-class (GLM-4.1V) models: HF safetensors and GGUF.",
    )
    parser.add_argument("--version", action="version", version=f"autoglm {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("AUTOGLM_LOG_LEVEL", "WARNING"),
                        help="logging level (DEBUG, INFO, WARNING, ...) [env AUTOGLM_LOG_LEVEL]")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    skipped = []
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"autoglm.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"autoglm.commands.{name}":
                raise  # the command exists but one of its imports is missing: say so
            skipped.append(name)
            continue
        module.register(sub)
    if skipped:
        log.debug("commands not available in this build: %s", ", ".join(skipped))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=str(args.log_level).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except AutoGLMError as e:
        print(f"autoglm {args.command}: error: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
