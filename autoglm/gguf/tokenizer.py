"""Tokenizer and chat template from GGUF `tokenizer.*` metadata, with llama.cpp's token ids.

We build the `tokenizers.Tokenizer` ourselves (no transformers at run time):
- `tokenizer.ggml.model == "llama"` (SentencePiece-style vocab with scores, Gemma): llama.cpp's SPM tokenizer
  repeatedly merges the adjacent pair whose concatenation is the highest-scoring vocab piece, then falls back to
  `<0xXX>` byte tokens. A BPE model whose merges are *every* split of every piece, ranked by the merged piece's
  score, performs the same merges; spaces become `▁` first (and a leading `▁` with `add_space_prefix`).
- `tokenizer.ggml.model == "gpt2"`: byte-level BPE with the file's merges, pre-split by the regexes llama.cpp
  uses for `tokenizer.ggml.pre`.
CONTROL tokens become special added tokens, USER_DEFINED ones plain added tokens: like llama.cpp (with
parse_special) they are cut out of the text before the model sees it.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf.constants import TokenType
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from autoglm.errors import ConfigError

if TYPE_CHECKING:
    from autoglm.tokenizer.chat_template import ChatTemplate
    from autoglm.tokenizer.tokenizer import Tokenizer

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), applied in order, each splitting the previous pieces.
_GPT2 = ["'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"]
_LLAMA3 = [
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?"
    "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
]
_QWEN2 = [
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?"
    "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
]
_STARCODER = ["\\p{N}", _GPT2[0]]  # digits split one by one first (StarCoder, SmolLM, Command-R, ...)
_FALCON = ["[\\p{P}\\$\\+<=>\\^~\\|`]+", _GPT2[0], "[0-9][0-9][0-9]"]
_DEFAULT = [
    "[\\p{P}\\$\\+<=>\\^~\\|]+",
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    "\\p{N}+",
    "[0-9][0-9][0-9]",
]
BPE_PRE_TOKENIZERS: dict[str, list[str]] = {
    "default": _DEFAULT,
    "gpt-2": _GPT2,
    "gpt2": _GPT2,
    "llama3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "dbrx": _LLAMA3,
    "smaug-bpe": _LLAMA3,
    "chatglm-bpe": _LLAMA3,
    "glm4": _LLAMA3,
    "falcon3": _LLAMA3,
    "qwen2": _QWEN2,
    "stablelm2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "smollm": _STARCODER,
    "starcoder": _STARCODER,
    "refact": _STARCODER,
    "command-r": _STARCODER,
    "codeshell": _STARCODER,
    "exaone": _STARCODER,
    "minerva-7b": _STARCODER,
    "mpt": _GPT2,
    "olmo": _GPT2,
    "jais": _GPT2,
    "phi-2": _GPT2,
    "falcon": _FALCON,
}
# llama.cpp matches a whole pre-tokenized word against the vocab before merging only for these
_IGNORE_MERGES = {"llama3", "llama-bpe"}

_SPECIAL_TYPES = {int(TokenType.CONTROL), int(TokenType.UNKNOWN)}
_USER_TYPE = int(TokenType.USER_DEFINED)


def _meta(md: dict[str, Any], key: str, source: str) -> Any:
    if key not in md:
        raise ConfigError(f"{source}: GGUF metadata has no {key!r}", param=key)
    return md[key]


def _token_types(md: dict[str, Any], n: int) -> list[int]:
    types = md.get("tokenizer.ggml.token_type")
    return [int(TokenType.NORMAL)] * n if types is None else [int(t) for t in types]


def _spm_backend(tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool) -> BackendTokenizer:
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    # Every split (left, right) of a normal piece into two vocab pieces is a merge, ranked by the piece's score
    # (higher first), then by id: the order llama.cpp's bigram queue would merge them in. Kept as id arrays
    # (not Python tuples) so that Gemma's 500k merges do not cost hundreds of MB at load time.
    lefts, rights, pieces = array("i"), array("i"), array("i")
    normal = int(TokenType.NORMAL)
    for i, piece in enumerate(tokens):
        if types[i] != normal or len(piece) < 2 or vocab.get(piece) != i:
            continue
        for k in range(1, len(piece)):
            li, ri = vocab.get(piece[:k]), vocab.get(piece[k:])
            if li is not None and ri is not None:
                lefts.append(li)
                rights.append(ri)
                pieces.append(i)
    p = np.frombuffer(pieces, dtype=np.int32)
    order = np.lexsort((p, -np.asarray(scores, dtype=np.float64)[p]))  # last key is primary: score desc, id
    lt, rt = np.frombuffer(lefts, dtype=np.int32)[order], np.frombuffer(rights, dtype=np.int32)[order]
    merges = [(tokens[a], tokens[b]) for a, b in zip(lt.tolist(), rt.tolist(), strict=True)]
    del lefts, rights, pieces, p, order, lt, rt
    unk = next((t for t, ty in zip(tokens, types, strict=True) if ty == int(TokenType.UNKNOWN)), None)
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True)
    backend = BackendTokenizer(bpe)
    norms: list[normalizers.Normalizer] = [normalizers.Replace(" ", "▁")]
    decs: list[decoders.Decoder] = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        norms.insert(0, normalizers.Prepend("▁"))
        decs.append(decoders.Strip(" ", 1, 0))
    backend.normalizer = normalizers.Sequence(norms)
    backend.decoder = decoders.Sequence(decs)
    return backend


def _bpe_backend(tokens: list[str], merges_raw: list[str], pre: str, source: str) -> BackendTokenizer:
    if pre not in BPE_PRE_TOKENIZERS:
        raise ConfigError(
            f"{source}: unsupported tokenizer.ggml.pre {pre!r} (supported: {', '.join(sorted(BPE_PRE_TOKENIZERS))})",
            param="tokenizer.ggml.pre",
        )
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    merges: list[tuple[str, str]] = []
    for m in merges_raw:
        left, sep, right = m.partition(" ")
        if not sep:
            raise ConfigError(f"{source}: malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((left, right))
    bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES)
    backend = BackendTokenizer(bpe)
    splits: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in BPE_PRE_TOKENIZERS[pre]
    ]
    splits.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(splits)
    backend.decoder = decoders.ByteLevel()
    return backend


def build_tokenizer(md: dict[str, Any], *, source: str = "gguf") -> Tokenizer:
    """A `Tokenizer` from GGUF metadata (`tokenizer.ggml.*`); ConfigError names the missing/unsupported key."""
    from autoglm.tokenizer.tokenizer import Tokenizer

    kind = _meta(md, "tokenizer.ggml.model", source)
    tokens = list(_meta(md, "tokenizer.ggml.tokens", source))
    types = _token_types(md, len(tokens))
    if len(types) != len(tokens):
        raise ConfigError(f"{source}: {len(types)} token types for {len(tokens)} tokens")
    if kind == "llama":
        scores = md.get("tokenizer.ggml.scores")
        score_list = [0.0] * len(tokens) if scores is None else [float(s) for s in scores]
        backend = _spm_backend(tokens, score_list, types, bool(md.get("tokenizer.ggml.add_space_prefix", True)))
    elif kind == "gpt2":
        merges = list(_meta(md, "tokenizer.ggml.merges", source))
        backend = _bpe_backend(tokens, merges, str(md.get("tokenizer.ggml.pre", "default")), source)
    else:
        raise ConfigError(
            f"{source}: unsupported tokenizer.ggml.model {kind!r} (supported: llama, gpt2)",
            param="tokenizer.ggml.model",
        )
    added = []
    for tok, ty in zip(tokens, types, strict=True):
        if ty in _SPECIAL_TYPES:
            added.append(AddedToken(tok, special=True, normalized=False))
        elif ty == _USER_TYPE:
            added.append(AddedToken(tok, special=False, normalized=False))
    # one call: ids are already in the vocab, so this only registers them for matching
    backend.add_special_tokens([a for a in added if a.special])
    backend.add_tokens([a for a in added if not a.special])

    def tid(key: str) -> int | None:
        v = md.get(f"tokenizer.ggml.{key}_token_id")
        if v is None:
            return None
        if not 0 <= int(v) < len(tokens):
            raise ConfigError(f"{source}: tokenizer.ggml.{key}_token_id {v} is outside the vocabulary")
        return int(v)

    # llama.cpp defaults: SPM adds BOS unless told otherwise, BPE does not
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
    return Tokenizer(
        backend,
        bos_token_id=tid("bos"),
        eos_token_id=tid("eos"),
        pad_token_id=tid("padding"),
        unk_token_id=tid("unknown"),
        add_bos=add_bos,
        add_eos=add_eos,
        special_ids=[i for i, ty in enumerate(types) if ty in _SPECIAL_TYPES],
        name=source,
    )


def build_chat_template(md: dict[str, Any], tokenizer: Tokenizer, *, source: str = "gguf") -> ChatTemplate | None:
    """`tokenizer.chat_template` (None when the file has none, e.g. a base model)."""
    text = md.get("tokenizer.chat_template")
    if not text:
        return None
    from autoglm.tokenizer.chat_template import ChatTemplate

    return ChatTemplate.from_string(
        str(text), bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, name=source
    )


def eos_token_ids(md: dict[str, Any]) -> list[int]:
    """Stop ids: eos plus end-of-turn (`eot`/`eom`) when the file names them, in that order, deduplicated."""
    out: list[int] = []
    for key in ("eos", "eot", "eom"):
        v = md.get(f"tokenizer.ggml.{key}_token_id")
        if v is not None and int(v) not in out:
            out.append(int(v))
    return out
