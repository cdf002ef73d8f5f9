"""Structured outputs: grammars compiled once per request, applied as a token bitmask row in the batched sampler.

Engine: llguidance (guidance-ai; also behind vLLM's "guidance" backend and llama.cpp's `%llguidance`). Chosen over
xgrammar by the measurements in BENCHMARKS.md ("Structured outputs"): both cost well under a decode step per token
on CPU; llguidance compiles a schema in ~1 ms instead of tens, builds its tokenizer from `tokenizer.json` alone (no
transformers / triton dependencies), and reports JSON-schema keywords it does not implement as errors where xgrammar
ignores them (`not`, `if`/`then`, `uniqueItems`): we answer 400 instead of constraining to the wrong language.

Flow: `GrammarCompiler(tokenizer, vocab_size)` once per model (the tokenizer's token table is built here, once) ->
`compile(GrammarSpec)` per request (validated; errors -> InvalidRequest naming the problem; cached by spec) ->
`CompiledGrammar.new_state()` per sequence -> each step `fill_mask(row)` before sampling and `accept(token)` after.

Bitmask layout (shared with `sampler.apply_token_bitmask`): int32 words, bit `t % 32` of word `t // 32` set when
token `t` is allowed; a row has `bitmask_width(vocab_size)` words.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import llguidance
import torch
from torch import Tensor

from autoglm.errors import InvalidRequest
from autoglm.tokenizer.tokenizer import Tokenizer

log = logging.getLogger("autoglm.grammar")

GrammarKind = Literal["json_object", "json_schema", "regex", "choice", "grammar", "lark"]

# JSON is written as `json.dumps` and the chat templates' `tojson` write it: ", " and ": ", no other whitespace.
# It keeps sampled JSON finite (free whitespace lets a hot sampler pad forever) and close to what models saw.
JSON_WHITESPACE: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row."""
    return (vocab_size + 31) // 32


def allocate_token_bitmask(batch: int, vocab_size: int) -> Tensor:
    """A [batch, bitmask_width] int32 CPU bitmask with every token allowed."""
    return torch.full((batch, bitmask_width(vocab_size)), -1, dtype=torch.int32)


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to. `value` is canonical text: the schema as sorted-key JSON, the regex,
    the choices as a JSON list, or the grammar text (GBNF or Lark for `grammar`, Lark for `lark`).
    `param` names the request field it came from (for error messages)."""

    kind: GrammarKind
    value: str = ""
    param: str = "response_format"

    @classmethod
    def json_object(cls, param: str = "response_format") -> GrammarSpec:
        return cls("json_object", "", param)

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str | bool, param: str = "response_format") -> GrammarSpec:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise InvalidRequest(f"{param}: the JSON schema is not valid JSON: {e}", param=param) from e
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, Mapping):
            raise InvalidRequest(f"{param}: a JSON schema must be an object, got {type(schema).__name__}",
                                 param=param)
        return cls("json_schema", json.dumps(schema, sort_keys=False, ensure_ascii=False), param)

    @classmethod
    def regex(cls, pattern: str, param: str = "guided_regex") -> GrammarSpec:
        if not isinstance(pattern, str):
            raise InvalidRequest(f"{param} must be a string", param=param)
        return cls("regex", pattern, param)

    @classmethod
    def choice(cls, choices: Sequence[str], param: str = "guided_choice") -> GrammarSpec:
        if isinstance(choices, str) or not choices or not all(isinstance(c, str) for c in choices):
            raise InvalidRequest(f"{param} must be a non-empty list of strings", param=param)
        return cls("choice", json.dumps(list(choices), ensure_ascii=False), param)

    @classmethod
    def grammar(cls, text: str, param: str = "guided_grammar") -> GrammarSpec:
        """A GBNF (llama.cpp) or Lark grammar; the dialect is recognised from the text."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest(f"{param} must be a non-empty grammar string", param=param)
        return cls("grammar", text, param)

    @classmethod
    def lark(cls, text: str, param: str = "tool_choice") -> GrammarSpec:
        return cls("lark", text, param)


def _with_json_whitespace(schema: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(schema)
    out["x-guidance"] = {**JSON_WHITESPACE, **dict(out.get("x-guidance") or {})}
    return out


def _llguidance_grammar(spec: GrammarSpec) -> str:
    """The spec as an llguidance grammar string (not yet checked against the tokenizer)."""
    try:
        if spec.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(_with_json_whitespace(_ANY_JSON_OBJECT))
        if spec.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(_with_json_whitespace(json.loads(spec.value)))
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.value)
        if spec.kind == "choice":
            return llguidance.grammar_from("choice", spec.value)
        if spec.kind == "grammar":
            return llguidance.grammar_from("grammar", spec.value)
        return llguidance.LLMatcher.grammar_from_lark(spec.value)
    except ValueError as e:  # GBNF that cannot be converted, a schema that is not an object
        raise InvalidRequest(f"{spec.param}: invalid {spec.kind.replace('_', ' ')}: {e}", param=spec.param) from e


def short_error(message: str, limit: int = 300) -> str:
    """The first line of a grammar-engine error, without the parser state and grammar it appends."""
    head = message.split("<state>", 1)[0].strip().splitlines()
    text = head[0] if head else "refused"
    return text if len(text) <= limit else text[:limit] + "..."


def is_limit_error(message: str) -> bool:
    """A grammar-engine error from its size limits (a grammar too large for it), not from a disallowed token."""
    return "; max is " in message or "fuel" in message


class CompiledGrammar:
    """A validated grammar for one tokenizer; `new_state()` per generated sequence."""

    def __init__(self, spec: GrammarSpec, grammar: str, tokenizer: llguidance.LLTokenizer, vocab_size: int) -> None:
        self.spec = spec
        self.vocab_size = vocab_size
        self._grammar = grammar
        self._tokenizer = tokenizer

    def new_state(self) -> GrammarState:
        return GrammarState(llguidance.LLMatcher(self._tokenizer, self._grammar, log_level=0), self.vocab_size)


class GrammarState:
    """One sequence's position in its grammar.

    Per decode step: `fill_mask(row)` writes the allowed tokens into a bitmask row, the sampler draws under it,
    then `accept(token)`. When `is_terminated()` the grammar is complete and only end-of-sequence remains: the
    engine finishes the request (finish_reason "stop"). `accept` of a disallowed token returns False and leaves the
    state in error (later masks allow only end-of-sequence); `error` says why."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher  # GrammarCompiler.fill_masks hands it to the batch executor
        self.vocab_size = vocab_size
        self.width = bitmask_width(vocab_size)

    def fill_mask(self, row: Tensor) -> None:
        """row: int32 [bitmask_width] view into a CPU, contiguous bitmask (one row of `allocate_token_bitmask`)."""
        if row.dtype != torch.int32 or row.device.type != "cpu" or not row.is_contiguous() or row.numel() != self.width:
            raise ValueError(f"bitmask row must be a contiguous CPU int32 tensor of {self.width} words, "
                             f"got {row.dtype} {tuple(row.shape)} on {row.device}")
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False when the grammar does not allow it."""
        return bool(self.matcher.consume_token(int(token_id)))

    def accept_tokens(self, token_ids: Sequence[int]) -> int:
        """Advance by several tokens (a prefill or a draft); returns how many were accepted."""
        return int(self.matcher.try_consume_tokens([int(t) for t in token_ids]))

    def is_terminated(self) -> bool:
        """The grammar is complete (or in error): nothing but end-of-sequence may follow."""
        return bool(self.matcher.is_stopped())

    def is_accepting(self) -> bool:
        """What was generated so far is a complete sentence of the grammar (end-of-sequence is allowed now)."""
        return bool(self.matcher.is_accepting())

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (speculative decoding, stop strings)."""
        if num_tokens > 0 and not self.matcher.rollback(num_tokens):
            raise ValueError(f"cannot roll back {num_tokens} tokens: {self.matcher.get_error()}")

    def fork(self) -> GrammarState:
        """An independent copy at the same position (n > 1 choices sharing a prompt)."""
        return GrammarState(self.matcher.deep_copy(), self.vocab_size)

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


class GrammarCompiler:
    """One per loaded model: the tokenizer's token table for the grammar engine (built here, once; a second or
    so for a 150k vocabulary) and an LRU of compiled grammars (a repeated schema costs nothing).

    `vocab_size` is the width of the model's logits (it may exceed the tokenizer's: padded embedding rows);
    `eos_token_ids` are the tokens that may end a sequence once the grammar is complete; `mask_threads` is how many
    threads `fill_masks` spreads a batch over (1: on a busy 2-core machine more threads measured slower)."""

    def __init__(self, tokenizer: Tokenizer, *, vocab_size: int | None = None, eos_token_ids: Sequence[int] = (),
                 cache_size: int = 128, mask_threads: int = 1) -> None:
        self.vocab_size = int(vocab_size or tokenizer.vocab_size)
        eos = [int(t) for t in eos_token_ids] or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None
                                                  else [])
        if not eos:
            raise InvalidRequest(f"structured outputs need an end-of-sequence token; {tokenizer.name!r} has none")
        self.eos_token_ids = eos
        self._tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                                 eos_token=eos)
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._executor = llguidance.LLExecutor(num_threads=max(1, mask_threads))

    def fill_masks(self, states: Sequence[GrammarState], bitmask: Tensor, rows: Sequence[int]) -> None:
        """Fill `bitmask[rows[i]]` for `states[i]`, the batch spread over the mask threads.
        bitmask: contiguous CPU int32 [B, bitmask_width] (e.g. `allocate_token_bitmask`)."""
        if (bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask.is_contiguous()
                or bitmask.dim() != 2 or bitmask.shape[1] != self.bitmask_width):
            raise ValueError(f"bitmask must be a contiguous CPU int32 [B, {self.bitmask_width}] tensor, "
                             f"got {bitmask.dtype} {tuple(bitmask.shape)} on {bitmask.device}")
        if len(states) != len(rows) or any(not 0 <= r < bitmask.shape[0] for r in rows):
            raise ValueError(f"rows {list(rows)} do not match {len(states)} states / {bitmask.shape[0]} mask rows")
        if states:
            self._executor.unsafe_compute_mask_ptr([(s.matcher, int(r)) for s, r in zip(states, rows, strict=True)],
                                                   bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])

    @property
    def bitmask_width(self) -> int:
        return bitmask_width(self.vocab_size)

    def _probe(self, compiled: CompiledGrammar, tries: int = 16) -> None:
        """The parser's size limits (items per Earley row, lexer fuel) show only while tokens are consumed: a wide
        object or a long choice list overflows right after its first token. Walk the first mask and up to `tries`
        of its tokens one step, so such a grammar is the client's 400 here and not a failure mid-generation."""
        mask = allocate_token_bitmask(1, self.vocab_size)
        state = compiled.new_state()
        state.fill_mask(mask[0])
        failed = state.error
        if failed is None:
            bits = (mask[0].view(-1, 1) >> torch.arange(32, dtype=torch.int32)) & 1
            allowed = bits.flatten().nonzero().flatten()[: tries + len(self.eos_token_ids)].tolist()
            for token in [t for t in allowed if t not in self.eos_token_ids][:tries]:
                step = state.fork()
                if step.accept(token):
                    step.fill_mask(mask[0])
                if step.error is not None and is_limit_error(step.error):
                    failed = step.error
                    break
        if failed is not None:
            spec = compiled.spec
            raise InvalidRequest(f"{spec.param}: the grammar is too large or complex for the output parser: "
                                 f"{short_error(failed)}", param=spec.param)

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Validate and compile; a bad or unsupported grammar -> InvalidRequest naming the field and the cause."""
        hit = self._cache.get(spec)
        if hit is not None:
            self._cache.move_to_end(spec)
            return hit
        grammar = _llguidance_grammar(spec)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        if is_error:
            what = {"json_schema": "JSON schema", "json_object": "JSON object grammar"}.get(spec.kind, spec.kind)
            raise InvalidRequest(f"{spec.param}: unsupported or invalid {what}: {'; '.join(messages)}",
                                 param=spec.param)
        for message in messages:
            log.warning("%s grammar warning: %s", spec.param, message)
        compiled = CompiledGrammar(spec, grammar, self._tokenizer, self.vocab_size)
        self._probe(compiled)
        self._cache[spec] = compiled
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return compiled
