"""Serve the real tiny model with a throttled prefill: a stand-in for a ~15k-token phone-agent prompt on a small CPU.

`python -m tests.server.slow_model MODEL_DIR --slow-prefill SECONDS --port P [serve flags]`: every engine step that
runs more than one token (a prefill chunk) sleeps SECONDS after the real forward. Everything else is the real
server: tokenizer, template, engine, HTTP.
"""

from __future__ import annotations

import sys
import time

import torch
from torch import Tensor, nn


class SlowPrefill(nn.Module):
    """The real decoder; a forward over more than one token takes `delay` seconds longer."""

    def __init__(self, inner: nn.Module, delay: float) -> None:
        super().__init__()
        self.inner = inner
        self.delay = delay
        for name in ("position_rows", "prompt_positions", "vocab_size", "hidden_size", "max_position_embeddings",
                     "embed_tokens", "compute_logits"):
            setattr(self, name, getattr(inner, name))

    def forward(self, input_ids: Tensor, *args: object, **kw: object) -> Tensor:
        hidden = self.inner(input_ids, *args, **kw)  # [T, D]
        if input_ids.shape[-1] > 1:
            time.sleep(self.delay)
        return hidden


def main(argv: list[str]) -> int:
    import argparse

    from autoglm.commands.serve import register, serve
    from autoglm.loader import load_model
    from autoglm.server.config import ServerConfig

    delay = 0.0
    if "--slow-prefill" in argv:
        at = argv.index("--slow-prefill")
        delay = float(argv[at + 1])
        argv = argv[:at] + argv[at + 2 :]
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = vars(parser.parse_args(["serve", *argv]))
    args["model"] = args.get("model") or args.get("model_pos")
    config = ServerConfig.from_sources(args)
    torch.set_num_threads(1)
    model = load_model(config.model, no_vision=True)
    model.decoder = SlowPrefill(model.decoder, delay)
    return serve(config, model=model)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
