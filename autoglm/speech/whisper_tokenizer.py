"""Whisper's token vocabulary: text via the `tokenizers` library, plus the special and timestamp ids.

Special tokens follow `<|endoftext|>` in a fixed order; language tokens lie between `<|startoftranscript|>` and
`<|translate|>`; timestamp tokens (`<|0.00|>`, `<|0.02|>`, ...) start right after `<|notimestamps|>` and are not in
tokenizer.json, so their ids are computed. English-only checkpoints start with `<|startoftranscript|>` alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from autoglm.errors import ConfigError, InvalidRequest

TIME_PRECISION = 0.02  # seconds per timestamp token
_LANG_RE = re.compile(r"^<\|([a-z]{2,3}(?:_[a-z]+)?)\|>$")
# Symbols that mark non-speech annotations (♪, [MUSIC], speaker tags): openai-whisper's list.
_NON_SPEECH = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』') + (
    "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
)
_MISC = "♩♪♫♬♭♮♯"


@dataclass
class WhisperTokenizer:
    tokenizer: Tokenizer
    multilingual: bool
    eot: int
    sot: int
    translate: int
    transcribe: int
    sot_lm: int
    sot_prev: int
    no_speech: int
    no_timestamps: int
    languages: dict[str, int] = field(default_factory=dict)  # "en" -> id of <|en|>

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1

    @classmethod
    def from_file(cls, path: str | Path, *, multilingual: bool) -> WhisperTokenizer:
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise ConfigError(f"{path}: cannot read the Whisper tokenizer ({e})") from e

        def need(token: str, *alts: str) -> int:
            for t in (token, *alts):
                i = tok.token_to_id(t)
                if i is not None:
                    return i
            raise ConfigError(f"{path}: the Whisper special token {token} is missing")

        sot, translate = need("<|startoftranscript|>"), need("<|translate|>")
        languages: dict[str, int] = {}
        for i in range(sot + 1, translate):
            m = _LANG_RE.match(tok.id_to_token(i) or "")
            if m:
                languages[m.group(1)] = i
        return cls(
            tokenizer=tok,
            multilingual=multilingual,
            eot=need("<|endoftext|>"),
            sot=sot,
            translate=translate,
            transcribe=need("<|transcribe|>"),
            sot_lm=need("<|startoflm|>"),
            sot_prev=need("<|startofprev|>"),
            no_speech=need("<|nospeech|>", "<|nocaptions|>"),
            no_timestamps=need("<|notimestamps|>"),
            languages=languages,
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of the ids below <|endoftext|> (special and timestamp ids are dropped)."""
        return self.tokenizer.decode([i for i in ids if i < self.eot])

    def language_code(self, token_id: int) -> str:
        for code, i in self.languages.items():
            if i == token_id:
                return code
        raise KeyError(token_id)

    def sot_sequence(self, language: str | None, task: str) -> list[int]:
        """<|startoftranscript|> [<|lang|> <|task|>] — the language and task only on multilingual models."""
        if not self.multilingual:
            return [self.sot]
        if language is None or language not in self.languages:
            raise InvalidRequest(f"unsupported language {language!r}", param="language")
        return [self.sot, self.languages[language], self.translate if task == "translate" else self.transcribe]

    def non_speech_tokens(self) -> list[int]:
        """Tokens of symbols that mark non-speech annotations; a leading ' -' / " '" inside words stays allowed."""
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in _NON_SPEECH + list(_MISC):
            for ids in (self.encode(symbol), self.encode(" " + symbol)):
                if len(ids) == 1 or symbol in _MISC:
                    result.add(ids[0])
        return sorted(result)

    def always_suppressed(self) -> list[int]:
        """Control tokens never sampled as text."""
        return [self.transcribe, self.translate, self.sot, self.sot_prev, self.sot_lm, self.no_speech]
