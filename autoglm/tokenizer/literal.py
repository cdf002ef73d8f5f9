"""Client text never becomes control tokens: only the chat template's own markup is parsed as special tokens.

A rendered prompt mixes template markup (`<|im_start|>user\\n`) with text the client sent (message contents, names,
tool results). Tokenizing it as one string lets a user who types `<|im_end|>`, `</think>` or `<|image|>` forge turns,
end the reasoning, or claim media slots. `encode_prompt` tokenizes the template's parts as usual and every client
span that contains added-token text *literally*, the way llama.cpp does with `parse_special=false`: added tokens are
not matched, the characters go through the normal model (BPE / SentencePiece) and become ordinary tokens.
Prompts whose client text holds no added-token string (all normal traffic) take one plain `encode` call, so their
ids are exactly what they were.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer


class LiteralEncoder:
    """Per-tokenizer helper: finds added-token strings in text and encodes text with added tokens switched off.

    The literal backend is a copy of the tokenizer without its added-token table, built on first use (most servers
    never see hostile text) under a lock; the shared backend itself is never reconfigured, so concurrent requests
    are safe. `max_token_chars` (the longest vocabulary entry) bounds how few tokens a text can become, so a text
    that cannot fit a context is refused before tokenizing it (tokenizers holds the GIL while it encodes: 10 MB took
    ~36 s and stalled the event loop).
    """

    def __init__(self, backend: BackendTokenizer) -> None:
        self._backend = backend
        contents = sorted({t.content for t in backend.get_added_tokens_decoder().values() if t.content},
                          key=len, reverse=True)
        self._markup = re.compile("|".join(re.escape(c) for c in contents)) if contents else None
        self._literal: BackendTokenizer | None = None
        self._lock = threading.Lock()
        self.max_token_chars = max((len(t) for t in backend.get_vocab(with_added_tokens=True)), default=1)

    def min_tokens(self, text: str) -> int:
        """A lower bound on the number of tokens `text` encodes to (each token covers at most max_token_chars
        characters: one per byte in byte-level BPE vocabularies, one per character in SentencePiece ones)."""
        return -(-len(text) // max(1, self.max_token_chars))

    def has_markup(self, text: str) -> bool:
        """Whether `text` contains the text of any added (control) token."""
        return self._markup is not None and self._markup.search(text) is not None

    def encode_literal(self, text: str) -> list[int]:
        """Ids of `text` with no added token matched (llama.cpp's parse_special=false)."""
        return list(self._literal_backend().encode(text, add_special_tokens=False).ids)

    def _literal_backend(self) -> BackendTokenizer:
        with self._lock:
            if self._literal is None:
                spec: dict[str, Any] = json.loads(self._backend.to_str())
                spec["added_tokens"] = []
                self._literal = BackendTokenizer.from_str(json.dumps(spec))
            return self._literal


def client_spans(rendered: str, client_texts: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of `client_texts` in `rendered`, searched in order (a template emits turns in order); a text
    the template transformed (e.g. stripped) is looked up stripped; one not found at all is skipped."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for text in client_texts:
        for needle in (text, text.strip()):
            if not needle:
                continue
            at = rendered.find(needle, cursor)
            if at < 0:
                at = rendered.find(needle)  # a template may reorder (system prompt hoisted, tools first)
            if at >= 0:
                spans.append((at, at + len(needle)))
                cursor = max(cursor, at + len(needle))
                break
    spans.sort()
    merged: list[tuple[int, int]] = []
    for lo, hi in spans:
        if merged and lo < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def encode_prompt(
    backend: BackendTokenizer, literal: LiteralEncoder, rendered: str, client_texts: Sequence[str]
) -> list[int]:
    """Ids of a rendered chat prompt in which the spans of `client_texts` never produce added tokens."""
    hostile = [t for t in client_texts if literal.has_markup(t)]
    if not hostile:
        return list(backend.encode(rendered, add_special_tokens=False).ids)
    ids: list[int] = []
    cursor = 0
    for lo, hi in client_spans(rendered, hostile):
        if lo > cursor:
            ids += backend.encode(rendered[cursor:lo], add_special_tokens=False).ids
        ids += literal.encode_literal(rendered[lo:hi])
        cursor = hi
    if cursor < len(rendered):
        ids += backend.encode(rendered[cursor:], add_special_tokens=False).ids
    return ids


def client_texts(messages: Sequence[Any]) -> list[str]:
    """Every string a client supplied in OpenAI-style messages (contents, text parts, names, tool call arguments,
    reasoning), in message order."""
    out: list[str] = []

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, str):
            if key not in ("role", "type", "tool_call_id", "id", "url", "data", "format"):
                out.append(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v, key)

    for m in messages:
        walk(dict(m) if not isinstance(m, dict) else m)
    return out
