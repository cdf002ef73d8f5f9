"""A decoder whose next token is a fixed function of the current token, for testing reasoning end to end.

A random tiny model never emits `<think>`; this one does, on cue: after the prompt's last token it writes
`<think> r1 r2 r3 </think> <answer> a1 a2 </answer>` and then EOS. Everything else in the server is real: tokenizer,
chat template, engine, scheduler, KV blocks, detokenizer, reasoning splitter, HTTP. The expected texts are computed
from the tokenizer (`expected_texts`), not written down.

Run as a script it serves that model: `python -m tests.server.scripted_model MODEL_DIR --port P [serve flags]`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from autoglm.layers.attention import Attention, AttentionContext
from autoglm.models.loaded import LoadedModel, ModuleInfo
from autoglm.models.positions import MediaSpan, PromptPositions, rope_positions

LOGIT = 50.0  # the scripted token beats every other by e^50: deterministic at any temperature


@dataclass(frozen=True)
class Script:
    reasoning_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    tags: dict[str, int]  # <think>, </think>, <answer>, </answer>
    eos_id: int


class ScriptedDecoder(nn.Module):
    """DecoderModel protocol: hidden = one-hot(next token); logits = LOGIT * hidden."""

    position_rows = 1

    def __init__(self, vocab_size: int, transition: dict[int, int], default_next: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = vocab_size
        self.max_position_embeddings = 1 << 16
        table = torch.full((vocab_size,), default_next, dtype=torch.long)
        for src, dst in transition.items():
            table[src] = dst
        self.register_buffer("next_token", table)
        # One real attention layer so that the engine sizes and attaches a KV cache as for any model.
        self.attn = Attention(num_heads=1, num_kv_heads=1, head_dim=8, scale=8**-0.5)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        # input_ids: [T] -> [T, V]
        return nn.functional.one_hot(self.next_token[input_ids], self.vocab_size).float()

    def forward(self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext,
                inputs_embeds: Tensor | None = None) -> Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)  # [T, V]
        q = hidden.new_zeros(hidden.shape[0], 1, 8)  # [T, H=1, D=8]: exercises the paged cache
        self.attn(q, q, q, ctx)
        return hidden

    def compute_logits(self, hidden: Tensor) -> Tensor:
        return hidden.float() * LOGIT  # [N, V]

    def prompt_positions(self, num_tokens: int, spans: Sequence[MediaSpan]) -> PromptPositions:
        return rope_positions(num_tokens, spans)


def make_script(model: LoadedModel) -> Script:
    tok = model.tokenizer
    tags = {t: tok.token_to_id(t) for t in ("<think>", "</think>", "<answer>", "</answer>")}
    missing = [t for t, i in tags.items() if i is None]
    if missing:
        raise RuntimeError(f"tokenizer lacks {missing}")
    # Five distinct plain-word tokens (letters only) for the reasoning and the answer.
    words = []
    for token_id in range(tok.vocab_size):
        if tok.is_special(token_id):
            continue
        text = tok.decode([token_id])
        if text.strip().isalpha() and len(text.strip()) >= 2 and text not in [tok.decode([w]) for w in words]:
            words.append(token_id)
        if len(words) == 5:
            break
    eos = model.eos_token_ids[0]
    return Script(tuple(words[:3]), tuple(words[3:]), tags, eos)  # type: ignore[arg-type]


def scripted_model(model: LoadedModel) -> tuple[LoadedModel, Script]:
    """Replace `model`'s decoder (keeping tokenizer, template, EOS ids) with the scripted one."""
    script = make_script(model)
    t = script.tags
    chain = [t["<think>"], *script.reasoning_ids, t["</think>"], t["<answer>"], *script.answer_ids, t["</answer>"],
             script.eos_id]
    transition = {a: b for a, b in zip(chain, chain[1:], strict=False)}
    vocab = int(model.decoder.vocab_size)
    decoder = ScriptedDecoder(vocab, transition, default_next=t["<think>"])  # any prompt tail starts thinking
    model.decoder = decoder
    model.encoders = {}
    model.generation_defaults = {}
    n_params = sum(b.numel() for b in decoder.buffers())
    model.modules = [ModuleInfo("decoder", model.path, "scripted", "int64", "cpu", n_params, n_params * 8, 0.0)]
    return model, script


def expected_texts(model: LoadedModel, script: Script) -> tuple[str, str]:
    """(reasoning, answer) exactly as the tokenizer decodes the scripted tokens."""
    return model.tokenizer.decode(list(script.reasoning_ids)), model.tokenizer.decode(list(script.answer_ids))


def serve_replaced(argv: list[str], replace: Callable[[LoadedModel], LoadedModel]) -> int:
    """`autoglm serve argv` with the loaded model passed through `replace` (which swaps its decoder)."""
    import argparse

    from autoglm.commands.serve import register, serve
    from autoglm.loader import load_model
    from autoglm.server.config import ServerConfig

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = vars(parser.parse_args(["serve", *argv]))
    args["model"] = args.get("model") or args.get("model_pos")
    config = ServerConfig.from_sources(args)
    torch.set_num_threads(1)
    return serve(config, model=replace(load_model(config.model, no_vision=True, chat_template=config.chat_template)))


def main(argv: list[str]) -> int:
    return serve_replaced(argv, lambda model: scripted_model(model)[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
