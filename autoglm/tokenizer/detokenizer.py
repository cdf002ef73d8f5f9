"""IncrementalDetokenizer: token ids in, text segments out, never half a UTF-8 character.

mlx-lm's streaming protocol (`reset`, `add_token`, `finalize`, `last_segment`). Works for any backend decoder by
decoding a short window of ids and emitting the growth of its text (the vLLM/TGI "prefix offset" method):

- the window starts one emission back, so decoders that look at the first token (SentencePiece's leading-space
  `Strip`) see the same first token in both decodes and the difference is exact;
- text ending in U+FFFD is held back: a byte-level token split a character, the next token completes it;
- with a ByteFallback decoder, text is held while the last kept token is a `<0xXX>` byte token, because the decoder
  turns a whole run of byte tokens into text at once (an invalid run becomes one U+FFFD per byte).

Invariant (tested with hypothesis): the concatenation of all segments after `finalize()` equals
`tokenizer.decode(all_ids, skip_special_tokens=...)`.
"""

from __future__ import annotations

from collections.abc import Iterable

from autoglm.tokenizer.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Streaming decoder for one generated sequence."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._byte_ids = tokenizer.byte_fallback_ids
        self._special = tokenizer.special_ids
        self.reset()

    def reset(self) -> None:
        """Forget all tokens and text (start a new sequence)."""
        self.tokens: list[int] = []
        self._prefix_offset = 0  # window start: the tokens of the previous emission
        self._read_offset = 0  # tokens before this are already emitted
        self._text_parts: list[str] = []
        self._unread: list[str] = []
        self._last_kept: int | None = None  # last token the decoder will see (skipped specials excluded)

    def add_token(self, token_id: int) -> None:
        """Append one generated id; whatever text it completes becomes part of `last_segment`."""
        token_id = int(token_id)
        self.tokens.append(token_id)
        if not (self.skip_special_tokens and token_id in self._special):
            self._last_kept = token_id
        if self._last_kept is not None and self._last_kept in self._byte_ids:
            return  # inside a run of <0xXX> tokens: the run decodes as a whole
        self._emit(final=False)

    def add_tokens(self, token_ids: Iterable[int]) -> None:
        for t in token_ids:
            self.add_token(t)

    def finalize(self) -> None:
        """Flush held-back text (the sequence ended: an incomplete character decodes as U+FFFD, as in `decode`)."""
        self._emit(final=True)

    @property
    def last_segment(self) -> str:
        """Text completed since the previous read of `last_segment` (reading clears it)."""
        segment = "".join(self._unread)
        self._unread = []
        return segment

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._text_parts)

    def _emit(self, *, final: bool) -> None:
        if self._read_offset >= len(self.tokens):
            return
        decode = self.tokenizer.backend.decode
        skip = self.skip_special_tokens
        window = self.tokens[self._prefix_offset :]
        prefix_text = decode(self.tokens[self._prefix_offset : self._read_offset], skip_special_tokens=skip)
        new_text = decode(window, skip_special_tokens=skip)
        if not final and (new_text.endswith(_REPLACEMENT) or len(new_text) <= len(prefix_text)):
            return  # an unfinished character, or nothing visible yet: wait for more tokens
        segment = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.tokens)
        if segment:
            self._text_parts.append(segment)
            self._unread.append(segment)
