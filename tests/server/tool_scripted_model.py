"""A decoder that answers every chat turn with one fixed text, for testing tool calls end to end.

A random tiny model never writes a tool call; this one writes `REPLY` (some content, then a GLM-4.5-style
`<tool_call>` with two arguments) after the last `<|assistant|>` of any prompt, then EOS. The reply repeats tokens
(`<`, `>`, newlines), so the next token cannot be a function of the current one (as in scripted_model.py): it is
`script[p - a]`, where `a` is the position of the last `<|assistant|>` at or before position `p`, found by the one
real attention layer over the engine's paged KV cache (a key scores high on `<|assistant|>` and on later
positions; its value is its position). Everything else in the server is real: tokenizer, chat template, engine,
scheduler, prefix cache, detokenizer, tool-call parser, HTTP.

Run as a script it serves that model: `python -m tests.server.tool_scripted_model MODEL_DIR --port P [serve flags]`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from autoglm.layers.attention import Attention, AttentionContext
from autoglm.models.loaded import LoadedModel, ModuleInfo
from autoglm.models.positions import MediaSpan, PromptPositions, rope_positions
from tests.server.scripted_model import LOGIT, serve_replaced

TRIGGER = "<|assistant|>"
REPLY = (
    "Let me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
    "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
)
_STEP = 20.0  # score per position: later keys win by e^20 per position
_TRIGGER_SCORE = 1e5  # beats every position bonus below 5000 positions


class OffsetScriptDecoder(nn.Module):
    """DecoderModel protocol: logits = LOGIT * one-hot(script[p - position of the last trigger])."""

    position_rows = 1

    def __init__(self, vocab_size: int, trigger_id: int, script: Sequence[int]) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = vocab_size
        self.max_position_embeddings = int(_TRIGGER_SCORE / _STEP)
        self.trigger_id = trigger_id
        self.register_buffer("script", torch.tensor(list(script), dtype=torch.long))
        self.attn = Attention(num_heads=1, num_kv_heads=1, head_dim=8, scale=1.0)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return nn.functional.one_hot(input_ids, self.vocab_size).float()  # [T, V]

    def forward(
        self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext, inputs_embeds: Tensor | None = None
    ) -> Tensor:
        pos = positions.reshape(-1, input_ids.shape[0])[0].float()  # [T]
        q = pos.new_zeros(pos.shape[0], 1, 8)
        k = torch.zeros_like(q)
        v = torch.zeros_like(q)
        q[:, 0, 0] = 1.0
        k[:, 0, 0] = (input_ids == self.trigger_id).float() * _TRIGGER_SCORE + pos * _STEP
        v[:, 0, 0] = pos
        trigger_at = self.attn(q, k, v, ctx)[:, 0, 0]  # [T]: position of the last trigger so far
        offset = (pos - trigger_at).round().long().clamp(0, self.script.shape[0] - 1)
        return nn.functional.one_hot(self.script[offset], self.vocab_size).float()  # [T, V]

    def compute_logits(self, hidden: Tensor) -> Tensor:
        return hidden.float() * LOGIT  # [N, V]

    def prompt_positions(self, num_tokens: int, spans: Sequence[MediaSpan]) -> PromptPositions:
        return rope_positions(num_tokens, spans)


def reply_script(model: LoadedModel) -> list[int]:
    """Token ids predicted at offsets 0, 1, ... from the last trigger: what the template writes after `<|assistant|>`
    in a generation prompt, then REPLY, then EOS (repeated: nothing follows)."""
    tok = model.tokenizer
    assert model.chat_template is not None
    prompt = model.chat_template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    tail = prompt[prompt.rindex(TRIGGER) + len(TRIGGER) :]
    tail_ids = tok.encode(tail, add_special_tokens=False) if tail else []
    return [*tail_ids, *tok.encode(REPLY, add_special_tokens=False), model.eos_token_ids[0]]


def tool_scripted_model(model: LoadedModel) -> LoadedModel:
    """Replace `model`'s decoder (keeping tokenizer, template, EOS ids) with the one that writes REPLY."""
    trigger = model.tokenizer.token_to_id(TRIGGER)
    if trigger is None:
        raise RuntimeError(f"tokenizer lacks {TRIGGER}")
    decoder = OffsetScriptDecoder(int(model.decoder.vocab_size), trigger, reply_script(model))
    model.decoder = decoder
    model.encoders = {}
    model.generation_defaults = {}
    n_params = sum(b.numel() for b in decoder.buffers())
    model.modules = [ModuleInfo("decoder", model.path, "scripted", "int64", "cpu", n_params, n_params * 8, 0.0)]
    return model


if __name__ == "__main__":
    sys.exit(serve_replaced(sys.argv[1:], tool_scripted_model))
