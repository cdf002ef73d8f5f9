"""`autoglm chat [MODEL] "prompt"`: stream one reply to the terminal (no prompt: an interactive multi-turn chat).

Reasoning is shown dimmed on a terminal and labelled `[thinking]` when stdout is a pipe or file; usage and speed go
to stderr so stdout holds only the reply.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

DIM, RESET = "\x1b[2m", "\x1b[0m"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description="Stream a reply to PROMPT (or chat interactively without one). MODEL: an HF directory or a .gguf "
        "file; default: the built-in model.",
    )
    p.add_argument("positional", nargs="*", metavar="[MODEL] PROMPT", help="optional model path, then the prompt")
    p.add_argument("-m", "--model", help="model directory or .gguf file (instead of the positional MODEL)")
    p.add_argument("--mmproj", help="GGUF vision projector for a GGUF model")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="attach an image (repeatable)")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-think", action="store_true", help="ask the model not to think (enable_thinking=False)")
    p.add_argument("--raw", action="store_true", help="plain completion of PROMPT, no chat template")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-vision", action="store_true", help="do not load the vision encoder")
    p.add_argument("--max-model-len", type=int, default=None)
    p.set_defaults(func=run)


class TerminalPrinter:
    """Writes streamed deltas: reasoning dimmed (tty) or after a `[thinking]` label (pipe); a newline between the
    reasoning block and the answer and at the end."""

    def __init__(self, write: Callable[[str], Any], tty: bool) -> None:
        self.write = write
        self.tty = tty
        self.in_reasoning = False
        self.wrote = False

    def delta(self, reasoning: str, content: str) -> None:
        if reasoning:
            if not self.in_reasoning:
                self.write(DIM if self.tty else ("\n" if self.wrote else "") + "[thinking] ")
                self.in_reasoning = True
            self.write(reasoning)
            self.wrote = True
        if content:
            if self.in_reasoning:
                self.write(RESET + "\n" if self.tty else "\n")
                self.in_reasoning = False
            self.write(content)
            self.wrote = True

    def end(self) -> None:
        if self.in_reasoning and self.tty:
            self.write(RESET)
        self.write("\n")


def split_positionals(args: argparse.Namespace) -> tuple[str | None, str | None]:
    pos = list(args.positional)
    if len(pos) > 2:
        raise SystemExit("autoglm chat: expected at most MODEL and PROMPT (quote the prompt)")
    model = args.model
    if len(pos) == 2:
        if model is not None:
            raise SystemExit("autoglm chat: give the model either as -m/--model or positionally, not both")
        model = pos[0]
    prompt = pos[-1] if pos else None
    if prompt == "-":
        prompt = sys.stdin.read()
    return model, prompt


def run(args: argparse.Namespace) -> int:
    model_path, prompt = split_positionals(args)
    from autoglm.llm import LLM

    llm = LLM(model_path, mmproj=args.mmproj, dtype=args.dtype, device=args.device, no_vision=args.no_vision,
              max_model_len=args.max_model_len, cpu_isa=getattr(args, "cpu_isa", None))
    sampling = {k: v for k, v in dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                      top_k=args.top_k, seed=args.seed).items() if v is not None}
    history: list[dict[str, Any]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    images = list(args.image)
    tty = sys.stdout.isatty()
    while True:
        if prompt is None:
            if not sys.stdin.isatty():
                prompt = sys.stdin.read()
            else:
                try:
                    prompt = input("> ")
                except EOFError:
                    return 0
        if args.raw or llm.model.chat_template is None:
            if llm.model.chat_template is None and not args.raw:
                print("[no chat template: plain completion]", file=sys.stderr)
            stream = llm.stream(prompt, **sampling)
        else:
            parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": p}} for p in images]
            content: Any = [*parts, {"type": "text", "text": prompt}] if parts else prompt
            history.append({"role": "user", "content": content})
            stream = llm.stream(history, enable_thinking=False if args.no_think else None, **sampling)
        printer = TerminalPrinter(lambda s: (sys.stdout.write(s), sys.stdout.flush()), tty)
        t0 = time.perf_counter()
        answer, usage, reason = [], None, None
        for d in stream:
            printer.delta(d.reasoning, d.text)
            answer.append(d.text)
            usage, reason = d.usage, d.finish_reason
        printer.end()
        if usage:
            dt = time.perf_counter() - t0
            print(f"[{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens, "
                  f"{usage['completion_tokens'] / max(dt, 1e-9):.1f} tok/s, finish: {reason}]", file=sys.stderr)
        if not args.raw and llm.model.chat_template is not None:
            history.append({"role": "assistant", "content": "".join(answer)})
        images = []
        if args.positional or not sys.stdin.isatty():
            return 0
        prompt = None
