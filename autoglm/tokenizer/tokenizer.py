"""Tokenizer: a thin wrapper over a `tokenizers.Tokenizer` with HF `tokenizer_config.json` semantics.

Ids equal transformers' `AutoTokenizer` (fast backend) for the same text: the backend's own pre-tokenizer, model,
added tokens and post-processor do the work; we only apply what transformers layers on top at load time
(special flags from `added_tokens_decoder`). The GGUF loader passes `add_bos`/`add_eos` explicitly instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as BackendTokenizer

from autoglm.errors import ConfigError, InvalidRequest
from autoglm.tokenizer.literal import LiteralEncoder

# transformers' named special-token attributes, in its order (all_special_tokens lists these first).
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json is a string or an AddedToken dict {"content": ...}."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class Tokenizer:
    """Text <-> token ids for one model.

    Build it from an HF directory (`from_hf_dir`) or from an already-built backend plus metadata (the GGUF loader
    does this): `Tokenizer(backend, bos_token_id=..., eos_token_id=..., add_bos=..., special_ids=...)`.
    `add_bos`/`add_eos` = None keep the backend's post-processor as it is; a bool replaces it with
    `[bos] $A [eos]` (GGUF `tokenizer.ggml.add_bos_token` semantics).
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        special_ids: Iterable[int] = (),
        extra_special_tokens: Sequence[str] = (),
        clean_up_tokenization_spaces: bool = False,
        name: str = "",
    ) -> None:
        self._backend = backend
        self.name = name
        vocab_size = backend.get_vocab_size(with_added_tokens=True)
        for label, tid in (("bos", bos_token_id), ("eos", eos_token_id), ("pad", pad_token_id), ("unk", unk_token_id)):
            if tid is not None and not 0 <= tid < vocab_size:
                raise ConfigError(f"{label}_token_id {tid} is outside the vocabulary (size {vocab_size}) of {name!r}")
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        # Ids given as special must decode as special too (skip_special_tokens is the backend's decision).
        self._mark_special(set(special_ids) | {t for t in (bos_token_id, eos_token_id, pad_token_id) if t is not None})
        if add_bos is not None or add_eos is not None:
            self._set_post_processor(bool(add_bos), bool(add_eos))
        self.special_ids: set[int] = {
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        } | {t for t in (bos_token_id, eos_token_id, pad_token_id, unk_token_id) if t is not None}
        # Extra specials named by a config count as special here (all_special_tokens) without changing how the
        # backend decodes them, as in transformers.
        self._extra_special_tokens = [t for t in extra_special_tokens if backend.token_to_id(t) is not None]
        self.special_ids |= {int(backend.token_to_id(t)) for t in self._extra_special_tokens}
        self.add_bos = self._adds_bos()
        self._byte_fallback_ids: frozenset[int] | None = None

    # --- construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json` when present) from an HF model directory."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise ConfigError(f"{tj} not found: only fast (tokenizer.json) tokenizers are supported")
        try:
            backend = BackendTokenizer.from_file(str(tj))
        except Exception as e:  # the Rust error names the bad field
            raise ConfigError(f"{tj} cannot be parsed: {e}") from e
        cfg_path = path / "tokenizer_config.json"
        cfg: dict[str, Any] = {}
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"{cfg_path} is not valid JSON: {e}") from e
        return cls.from_backend_and_config(backend, cfg, name=str(path))

    @classmethod
    def from_backend_and_config(
        cls, backend: BackendTokenizer, cfg: Mapping[str, Any], *, name: str = ""
    ) -> Tokenizer:
        """Apply an HF tokenizer_config.json dict to a backend the way transformers does at load time."""
        # Tokens in added_tokens_decoder but missing from tokenizer.json are added (as transformers does); the
        # ones tokenizer.json already has keep its flags (transformers does not override them either).
        decoder = cfg.get("added_tokens_decoder") or {}
        for sid, entry in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            content = _token_content(entry)
            if content is None:
                raise ConfigError(f"added_tokens_decoder[{sid}] in {name!r} has no string 'content'")
            tid = backend.token_to_id(content)
            if tid is not None:
                if tid != int(sid):
                    raise ConfigError(
                        f"added token {content!r} is id {tid} in tokenizer.json but {sid} in tokenizer_config.json"
                        f" ({name})"
                    )
                continue
            if int(sid) != backend.get_vocab_size(with_added_tokens=True):
                raise ConfigError(
                    f"added token {content!r} has id {sid} in {name!r}, but the next free id is "
                    f"{backend.get_vocab_size(with_added_tokens=True)}"
                )
            special = bool(entry.get("special", False))
            tok = AddedToken(
                content,
                single_word=bool(entry.get("single_word", False)),
                lstrip=bool(entry.get("lstrip", False)),
                rstrip=bool(entry.get("rstrip", False)),
                normalized=bool(entry.get("normalized", not special)),
                special=special,
            )
            if special:
                backend.add_special_tokens([tok])
            else:
                backend.add_tokens([tok])

        def tid_of(key: str) -> int | None:
            content = _token_content(cfg.get(key))
            if content is None:
                return None
            tid = backend.token_to_id(content)
            if tid is None:
                raise ConfigError(f"{key} {content!r} of {name!r} is not in the vocabulary")
            return int(tid)

        extra: list[str] = []
        for key in ("additional_special_tokens", "extra_special_tokens"):
            value = cfg.get(key)
            if isinstance(value, list):
                extra += [c for c in (_token_content(v) for v in value) if c is not None and c not in extra]
            elif isinstance(value, Mapping):  # v5 named extras {"image_token": "<|image|>"}
                extra += [c for c in (_token_content(v) for v in value.values()) if c is not None and c not in extra]
        # transformers v5's generic fast backend keeps tokenizer.json's post-processor and does not act on
        # add_bos_token/add_eos_token from the config; do the same so ids stay equal.
        return cls(
            backend,
            bos_token_id=tid_of("bos_token"),
            eos_token_id=tid_of("eos_token"),
            pad_token_id=tid_of("pad_token"),
            unk_token_id=tid_of("unk_token"),
            extra_special_tokens=extra,
            clean_up_tokenization_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)),
            name=name,
        )

    def _mark_special(self, ids: set[int]) -> None:
        existing = self._backend.get_added_tokens_decoder()
        todo = []
        for tid in sorted(ids):
            old = existing.get(tid)
            if old is not None and old.special:
                continue
            content = self._backend.id_to_token(tid)
            if content is None:
                raise ConfigError(f"special token id {tid} is not in the vocabulary of {self.name!r}")
            todo.append(AddedToken(content, special=True, normalized=False))
        if todo:
            self._backend.add_special_tokens(todo)

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        bos = self.id_to_token(self.bos_token_id) if add_bos and self.bos_token_id is not None else None
        eos = self.id_to_token(self.eos_token_id) if add_eos and self.eos_token_id is not None else None
        single = " ".join(x for x in (f"{bos}:0" if bos else "", "$A:0", f"{eos}:0" if eos else "") if x)
        pair = " ".join(x for x in (single, f"{bos}:1" if bos else "", "$B:1", f"{eos}:1" if eos else "") if x)
        specials = [(t, self._backend.token_to_id(t)) for t in (bos, eos) if t]
        self._backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    def _adds_bos(self) -> bool:
        if self.bos_token_id is None:
            return False
        ids = self._backend.encode("", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_token_id

    # --- the API -------------------------------------------------------------------------------------------------
    @property
    def backend(self) -> BackendTokenizer:
        """The underlying `tokenizers.Tokenizer` (read-only use)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the largest id + 1 for contiguous vocabularies)."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings inside `text` become their ids (as in transformers)."""
        if not isinstance(text, str):
            raise InvalidRequest(f"text to encode must be a string, got {type(text).__name__}")
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    @cached_property
    def literal(self) -> LiteralEncoder:
        """Encodes client text without matching control tokens (autoglm.tokenizer.literal)."""
        return LiteralEncoder(self._backend)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Ids outside the vocabulary raise InvalidRequest naming the id."""
        ids = [int(i) for i in ids]
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise InvalidRequest(f"token id {i} is outside the vocabulary (size {n})")
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self._backend.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)  # transformers skips this for BPE models
        return text

    def token_to_id(self, token: str) -> int | None:
        tid = self._backend.token_to_id(token)
        return None if tid is None else int(tid)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    @property
    def all_special_tokens(self) -> list[str]:
        """Named specials (bos, eos, unk, pad), then the config's extra specials, then other special added tokens."""
        out: list[str] = []
        for tid in (self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id):
            tok = self.id_to_token(tid) if tid is not None else None
            if tok is not None and tok not in out:
                out.append(tok)
        out += [t for t in self._extra_special_tokens if t not in out]
        for tid in sorted(self.special_ids):
            tok = self.id_to_token(tid)
            if tok is not None and tok not in out:
                out.append(tok)
        return out

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None

    @property
    def pad_token(self) -> str | None:
        return self.id_to_token(self.pad_token_id) if self.pad_token_id is not None else None

    @property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of `<0xXX>` byte tokens when the decoder has ByteFallback (SentencePiece-style), else empty.
        ByteFallback decodes a whole run of byte tokens at once, so streaming must not cut a run."""
        cached = self._byte_fallback_ids
        if cached is None:
            cached = frozenset()
            decoder = self._backend.decoder
            if decoder is not None and b'"ByteFallback"' in decoder.__getstate__():
                added = self._backend.get_added_tokens_decoder()
                ids = (self._backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
                cached = frozenset(int(i) for i in ids if i is not None and i not in added)
            self._byte_fallback_ids = cached
        return cached

    def get_vocab(self) -> dict[str, int]:
        return dict(self._backend.get_vocab(with_added_tokens=True))

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"


def _clean_up_tokenization(text: str) -> str:
    """transformers' legacy clean-up (WordPiece-era): no space before punctuation and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text
