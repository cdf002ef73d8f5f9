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
from typing import Any

from autoglm import __version__
from autoglm.errors import AutoGLMError, InvalidRequest

CPU_ISA_CHOICES = ("auto", "avx512", "avxvnni", "avx2", "scalar", "neon")

COMMANDS: tuple[str, ...] = ("serve", "chat", "inspect", "convert", "quantize", "bench", "plan", "prune", "models")
COMMANDS += ("store", "run", "ps")  # Ollama's verbs: store.py registers create / list / show / rm / cp

# commands that compute with torch: without --threads / AUTOGLM_THREADS they get every core this process may use
COMPUTE_COMMANDS = ("serve", "chat", "bench", "prune", "quantize", "run")

log = logging.getLogger("autoglm.cli")


def _threads_value(value: str, source: str = "--threads") -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise InvalidRequest(f"{source} must be a positive integer (CPU threads), got {value!r}", param="threads")
    return n


def _threads_arg(value: str) -> int:
    try:
        return _threads_value(value)
    except InvalidRequest as e:
        raise argparse.ArgumentTypeError(e.message) from None


def available_cores() -> int:
    """CPUs this process may run on (the affinity mask, which containers and taskset narrow), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_threads(flag: int | None, command: str | None) -> int | None:
    """--threads > AUTOGLM_THREADS > all cores (compute commands only; None: leave torch alone)."""
    if flag is not None:
        return flag
    env = os.environ.get("AUTOGLM_THREADS")
    if env not in (None, ""):
        return _threads_value(env, "AUTOGLM_THREADS")
    return available_cores() if command in COMPUTE_COMMANDS else None


def _check_cpu_isa(flag: str | None, command: str | None) -> None:
    """--cpu-isa > AUTOGLM_CPU_ISA: validated at start (CpuIsaError names what the CPU lacks). The environment is
    left alone: each command hands the flag (`args.cpu_isa`) to the loader through its own config (ServerConfig,
    BenchConfig, `LLM(cpu_isa=...)`, `load_model(cpu_isa=...)`); without it `select_kernels` reads
    $AUTOGLM_CPU_ISA at each selection."""
    if flag is None and (command not in COMPUTE_COMMANDS or not os.environ.get("AUTOGLM_CPU_ISA")):
        return
    from autoglm.kernels.cpu import variants

    chosen = variants.resolve(flag)
    log.info("CPU kernels ISA: %s (requested %s)", chosen, variants.requested(flag))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoglm",
        description="Offline inference for AutoGLM-Phone-class (GLM-4.1V) models: HF safetensors and GGUF.",
    )
    parser.add_argument("--version", action="version", version=f"autoglm {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("AUTOGLM_LOG_LEVEL", "WARNING"),
                        help="logging level (DEBUG, INFO, WARNING, ...) [env AUTOGLM_LOG_LEVEL]")
    # dest differs from `bench --threads`: a subparser's default would overwrite a same-named global value
    parser.add_argument("--threads", dest="global_threads", type=_threads_arg, default=None, metavar="N",
                        help="CPU threads for compute (torch.set_num_threads), set before the command runs "
                        "[env AUTOGLM_THREADS; default: all cores]")
    # = autoglm.kernels.cpu.variants.CHOICES (not imported here: the kernels package imports torch)
    parser.add_argument("--cpu-isa", dest="cpu_isa", default=None, metavar="ISA",
                        choices=CPU_ISA_CHOICES,
                        help=f"CPU kernel variant: {'|'.join(CPU_ISA_CHOICES)}; one this CPU lacks is an error at "
                        "start [env AUTOGLM_CPU_ISA; default: auto, the best this CPU runs]")
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
    _frame_flags_after_command(parser, sub)
    return parser


def _frame_flags_after_command(parser: argparse.ArgumentParser, sub: Any) -> None:
    """`autoglm serve --cpu-isa avx2` as well as `autoglm --cpu-isa avx2 serve` (vLLM / llama.cpp users put every flag
    after the command): each command also takes the frame's flags, defaulting to "not given" so the frame's value
    stays; a command's own flag of the same name (`bench --threads`) wins."""
    frame = [a for a in parser._actions if a.dest in ("cpu_isa", "global_threads", "log_level")]
    for command in sub.choices.values():
        for action in frame:
            if any(o in command._option_string_actions for o in action.option_strings):
                continue
            command.add_argument(*action.option_strings, dest=action.dest, default=argparse.SUPPRESS,
                                 type=action.type, choices=action.choices, metavar=action.metavar,
                                 help=action.help)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=str(args.log_level).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        threads = resolve_threads(args.global_threads, args.command)
        if threads is not None:
            import torch  # only here: `autoglm --help` and light commands stay torch-free

            torch.set_num_threads(threads)
            log.info("using %d CPU threads", threads)
        args.global_threads = threads
        _check_cpu_isa(args.cpu_isa, args.command)
        return int(func(args) or 0)
    except AutoGLMError as e:
        print(f"autoglm {args.command}: error: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `autoglm models --json | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush does not raise again
        return 141
    except (OSError, ValueError, TypeError, KeyError, IndexError, RecursionError, UnicodeError, ZeroDivisionError,
            OverflowError, MemoryError) as e:
        # a file or argument no check anticipated: one line naming the cause (the traceback at --log-level debug)
        log.debug("autoglm %s failed", args.command, exc_info=True)
        print(f"autoglm {args.command}: error: {type(e).__name__}: {str(e)[:500]} (run with --log-level debug for "
              "the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
