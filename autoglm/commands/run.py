"""`autoglm run NAME [PROMPT]`: a store model (or a model path) in this process: one reply to PROMPT, or a simple
chat loop reading stdin (`/bye` or end of input quits). The Modelfile's TEMPLATE, SYSTEM, MESSAGEs and PARAMETERs
apply, as `ollama run` applies them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="chat with a store model (autoglm create) in this process",
                              description="One reply to PROMPT, or an interactive chat without one. NAME: a store "
                              "model, or a GGUF file / HF directory.")
    p.add_argument("name")
    p.add_argument("prompt", nargs="*", help="the prompt (omit for a chat loop)")
    p.add_argument("--max-tokens", type=int, default=None, help="reply length cap [the model's num_predict]")
    p.add_argument("--think", action="store_true", help="also print the model's reasoning (to stderr)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autoglm.errors import ModelNotFound
    from autoglm.llm import LLM
    from autoglm.store.options import sampling_kwargs
    from autoglm.store.store import ModelStore
    from autoglm.tokenizer.ollama_template import OllamaTemplate

    store = ModelStore()
    template = None
    params: dict[str, Any] = {}
    system: str | None = None
    history: list[dict[str, str]] = []
    if store.exists(args.name):
        m = store.get(args.name)
        path = m.source.path
        template = OllamaTemplate(m.template) if m.template is not None else None
        params, system, history = dict(m.parameters), m.system, list(m.messages)
    elif Path(args.name).expanduser().exists():
        path = str(Path(args.name).expanduser())
    else:
        raise ModelNotFound(f"model '{args.name}' not found (`autoglm list` shows the store; or give a GGUF file / "
                            "HF directory)")
    if system is not None:
        history.insert(0, {"role": "system", "content": system})
    sampling = sampling_kwargs(params)
    if args.max_tokens is not None:
        sampling["max_tokens"] = args.max_tokens
    llm = LLM(path, cpu_isa=getattr(args, "cpu_isa", None))  # autoglm --cpu-isa

    def reply(messages: list[dict[str, str]]) -> str:
        prompt: Any = messages
        if template is not None:
            prompt = llm.tokenize(template.render(messages), add_special_tokens=False)
        text = []
        for delta in llm.stream(prompt, **sampling):
            if args.think and delta.reasoning:
                print(delta.reasoning, end="", file=sys.stderr, flush=True)
            print(delta.text, end="", flush=True)
            text.append(delta.text)
        print()
        return "".join(text)

    if args.prompt:
        reply([*history, {"role": "user", "content": " ".join(args.prompt)}])
        return 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/bye", "/exit"):
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        history.append({"role": "assistant", "content": reply(history)})
