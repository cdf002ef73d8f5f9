"""Structured outputs: what the engine will do (random logits, the grammar's bitmask, autoglm's Sampler at
temperature 1) always yields text in the requested language; bad or unsupported requests are 400s.

Oracles: `jsonschema` for JSON schemas, `re.fullmatch` for regexes, the tool-call parsers for tool grammars.
Tokenizer: the session's tiny GLM-style byte-level BPE (fast); one test repeats the schema check on the built-in
Gemma 3 GGUF's real 262k-token vocabulary.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from autoglm.engine.grammar import GrammarCompiler, GrammarSpec, GrammarState, allocate_token_bitmask
from autoglm.engine.sampler import Sampler, SamplingRow
from autoglm.engine.structured_output import structured_output_spec
from autoglm.engine.tool_grammar import tool_call_grammar
from autoglm.errors import InvalidRequest
from autoglm.tokenizer.tokenizer import Tokenizer
from autoglm.tokenizer.tool_parsers import Glm4ToolFormat, Glm45ToolFormat, HermesToolFormat, ToolFormat

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "hourly": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "where": {"type": "object", "properties": {"lat": {"type": "integer"}}, "required": ["lat"],
                  "additionalProperties": False},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 5}]},
    },
    "required": ["city", "unit", "days", "hourly", "tags", "where"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
        "additionalProperties": False}}},
]


@pytest.fixture(scope="module")
def tok(glm_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_hf_dir(glm_tokenizer_dir)


@pytest.fixture(scope="module")
def compiler(tok: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tok)


def sample(state: GrammarState, tok: Tokenizer, compiler: GrammarCompiler, seed: int, max_tokens: int = 400) -> str:
    """Random logits under the grammar's mask, drawn by the engine's sampler, until the grammar ends."""
    gen = torch.Generator().manual_seed(seed)
    bitmask = allocate_token_bitmask(1, compiler.vocab_size)
    out: list[int] = []
    for _ in range(max_tokens):
        state.fill_mask(bitmask[0])
        logits = torch.randn(1, compiler.vocab_size, generator=gen) * 2
        (token,), _ = Sampler()(logits, [SamplingRow(temperature=1.0, generator=gen, token_bitmask=bitmask[0])])
        if token in compiler.eos_token_ids:
            assert state.is_accepting()
            break
        assert state.accept(token), state.error
        out.append(token)
        if state.is_terminated():
            break
    else:
        pytest.fail(f"grammar did not finish in {max_tokens} tokens: {tok.decode(out)!r}")
    return tok.decode(out, skip_special_tokens=False)


def test_json_schema_outputs_always_validate(tok: Tokenizer, compiler: GrammarCompiler) -> None:
    grammar = compiler.compile(GrammarSpec.json_schema(SCHEMA))
    for seed in range(50):
        text = sample(grammar.new_state(), tok, compiler, seed)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert ", " in text or text.count(",") == 0  # json.dumps separators: ", " and ": "


def test_json_schema_on_a_real_262k_vocabulary() -> None:
    from autoglm.builtins import builtin_path
    from autoglm.gguf.reader import GGUFFile
    from autoglm.gguf.tokenizer import build_tokenizer, eos_token_ids

    f = GGUFFile(builtin_path("gemma-3-270m"))
    gemma = build_tokenizer(f.metadata, source="gemma")
    comp = GrammarCompiler(gemma, eos_token_ids=eos_token_ids(f.metadata))
    assert comp.vocab_size == 262144
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["city", "n"], "additionalProperties": False}
    grammar = comp.compile(GrammarSpec.json_schema(schema))
    for seed in range(5):
        jsonschema.validate(json.loads(sample(grammar.new_state(), gemma, comp, seed)), schema)
    state = grammar.new_state()  # the tokenizer's own spelling of a valid object is accepted token by token
    ids = gemma.encode('{"city": "Köln ✓", "n": 7}', add_special_tokens=False)
    assert state.accept_tokens(ids) == len(ids) and state.is_accepting()


def test_json_object_regex_choice_and_gbnf(tok: Tokenizer, compiler: GrammarCompiler) -> None:
    obj = compiler.compile(GrammarSpec.json_object())
    regex = compiler.compile(GrammarSpec.regex(r"(ab|c)[0-9]{2,4}x"))
    choice = compiler.compile(GrammarSpec.choice(["yes", "no", "maybe not"]))
    gbnf = compiler.compile(GrammarSpec.grammar('root ::= "A" digit+ "B"\ndigit ::= [0-9]'))
    for seed in range(10):
        state = obj.new_state()
        ids = tok.encode('{"a": [1, "x"], "b": {}}', add_special_tokens=False)
        assert state.accept_tokens(ids) == len(ids) and state.is_accepting()
        assert re.fullmatch(r"(ab|c)[0-9]{2,4}x", sample(regex.new_state(), tok, compiler, seed))
        assert sample(choice.new_state(), tok, compiler, seed) in {"yes", "no", "maybe not"}
        assert re.fullmatch(r"A[0-9]+B", sample(gbnf.new_state(), tok, compiler, seed, max_tokens=2000))


@pytest.mark.parametrize("fmt", [HermesToolFormat(), Glm45ToolFormat(), Glm4ToolFormat()], ids=lambda f: f.name)
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_forced_tool_calls_parse_and_validate(fmt: ToolFormat, choice: Any, tok: Tokenizer,
                                              compiler: GrammarCompiler) -> None:
    spec = tool_call_grammar(fmt, TOOLS, choice, tok)
    assert spec is not None
    grammar = compiler.compile(spec)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(8):
        text = sample(grammar.new_state(), tok, compiler, seed, max_tokens=1000)
        parsed = fmt.parse(text, TOOLS)
        assert parsed.tool_calls, text
        assert parsed.content is None, text
        for call in parsed.tool_calls:
            if choice != "required":
                assert call.name == "get_time"
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def test_parallel_tool_calls_false_allows_one_call(tok: Tokenizer, compiler: GrammarCompiler) -> None:
    spec = tool_call_grammar(HermesToolFormat(), TOOLS, "required", tok, parallel_tool_calls=False)
    grammar = compiler.compile(spec)  # type: ignore[arg-type]
    for seed in range(4):
        assert len(HermesToolFormat().parse(sample(grammar.new_state(), tok, compiler, seed), TOOLS).tool_calls) == 1


def test_glm45_raw_string_constraints_that_cannot_be_enforced_are_400s(tok: Tokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "mail", "parameters": {
        "type": "object", "properties": {"to": {"type": "string", "format": "email"}}}}}]
    with pytest.raises(InvalidRequest, match="format"):
        tool_call_grammar(Glm45ToolFormat(), tools, "required", tok)


def test_batched_fill_equals_row_by_row(tok: Tokenizer, compiler: GrammarCompiler) -> None:
    grammars = [compiler.compile(GrammarSpec.json_schema(SCHEMA)), compiler.compile(GrammarSpec.regex("[0-9]+x")),
                compiler.compile(GrammarSpec.choice(["yes", "no"]))]
    states = [g.new_state() for g in grammars]
    states[0].accept_tokens(tok.encode('{"city": "Ro', add_special_tokens=False))
    one = allocate_token_bitmask(3, compiler.vocab_size)
    for i, st in enumerate(states):
        st.fill_mask(one[i])
    batched = allocate_token_bitmask(4, compiler.vocab_size)
    compiler.fill_masks(states, batched, [2, 0, 3])
    assert torch.equal(batched[[2, 0, 3]], one) and bool((batched[1] == -1).all())  # row 1 untouched
    with pytest.raises(ValueError, match="rows"):
        compiler.fill_masks(states, batched, [0, 1])


def test_tool_choice_none_and_auto_impose_nothing(tok: Tokenizer) -> None:
    for choice in (None, "none", "auto"):
        assert tool_call_grammar(HermesToolFormat(), TOOLS, choice, tok) is None


def test_forced_tool_choice_errors(tok: Tokenizer) -> None:
    with pytest.raises(InvalidRequest, match="not in tools"):
        tool_call_grammar(HermesToolFormat(), TOOLS, {"type": "function", "function": {"name": "nope"}}, tok)
    with pytest.raises(InvalidRequest, match="no tools"):
        tool_call_grammar(HermesToolFormat(), [], "required", tok)
    with pytest.raises(InvalidRequest, match="tool_choice must be"):
        tool_call_grammar(HermesToolFormat(), TOOLS, "always", tok)


@pytest.mark.parametrize(("schema", "cause"), [
    ({"type": "strng"}, "strng"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"if": {"type": "string"}, "then": {"maxLength": 2}}, "if"),
    ({"$ref": "#/$defs/missing"}, "missing"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
    ({"type": "string", "pattern": "[a-"}, "regex"),
])
def test_bad_or_unsupported_schemas_are_400s_naming_the_cause(schema: dict[str, Any], cause: str,
                                                              compiler: GrammarCompiler) -> None:
    spec = structured_output_spec(response_format={"type": "json_schema",
                                                   "json_schema": {"name": "x", "schema": schema, "strict": True}})
    assert spec is not None
    with pytest.raises(InvalidRequest, match=re.escape(cause)) as e:
        compiler.compile(spec)
    assert e.value.status == 400 and e.value.param == "response_format.json_schema.schema"


def test_bad_regex_and_grammar_are_400s(compiler: GrammarCompiler) -> None:
    with pytest.raises(InvalidRequest, match="guided_regex"):
        compiler.compile(GrammarSpec.regex("(unclosed"))
    with pytest.raises(InvalidRequest, match="guided_grammar"):
        compiler.compile(GrammarSpec.grammar("root ::= ( "))


def test_request_fields_map_to_one_spec() -> None:
    assert structured_output_spec() is None
    assert structured_output_spec(response_format={"type": "text"}) is None
    assert structured_output_spec(response_format={"type": "json_object"}) == GrammarSpec.json_object()
    assert structured_output_spec(guided_json='{"type": "object"}').kind == "json_schema"  # type: ignore[union-attr]
    assert structured_output_spec(guided_choice=["a", "b"]).value == '["a", "b"]'  # type: ignore[union-attr]
    assert structured_output_spec(structured_outputs={"regex": "a+"}).kind == "regex"  # type: ignore[union-attr]
    assert structured_output_spec(ollama_format="json").kind == "json_object"  # type: ignore[union-attr]
    assert structured_output_spec(ollama_format={"type": "object"}).kind == "json_schema"  # type: ignore[union-attr]
    with pytest.raises(InvalidRequest, match="only one output constraint"):
        structured_output_spec(response_format={"type": "json_object"}, guided_regex="a")
    with pytest.raises(InvalidRequest, match="structural_tag"):
        structured_output_spec(structured_outputs={"structural_tag": "{}"})
    with pytest.raises(InvalidRequest, match="json_schema.schema is required"):
        structured_output_spec(response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(InvalidRequest, match="not supported"):
        structured_output_spec(response_format={"type": "yaml"})
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        structured_output_spec(guided_json="{nope")
    with pytest.raises(InvalidRequest, match="non-empty list"):
        structured_output_spec(guided_choice=[])


def test_state_rejects_rolls_back_and_forks(tok: Tokenizer, compiler: GrammarCompiler) -> None:
    grammar = compiler.compile(GrammarSpec.choice(["abc", "abd"]))
    assert compiler.compile(GrammarSpec.choice(["abc", "abd"])) is grammar  # cached per spec
    state = grammar.new_state()
    a, b, c, d = (tok.encode(ch, add_special_tokens=False) for ch in "abcd")
    assert state.accept_tokens(a + b) == len(a + b)
    fork = state.fork()
    assert state.accept_tokens(c) == len(c) and state.is_accepting()
    assert fork.accept_tokens(d) == len(d) and fork.is_accepting()  # the fork did not see "c"
    state.rollback(len(c))
    assert not state.is_accepting() and state.accept_tokens(d) == len(d)
    bad = grammar.new_state()
    assert not bad.accept(d[0]) and bad.error and bad.is_terminated()
    with pytest.raises(ValueError, match="bitmask row"):
        bad.fill_mask(torch.zeros(3, dtype=torch.int32))


def test_a_grammar_past_the_parsers_limits_is_a_400_at_compile(tok: Tokenizer, compiler: GrammarCompiler) -> None:
    """700 properties compile but overflow the parser's row limit at the first mask: a 400 naming the field, with
    the engine's first line of the cause and none of the parser state or grammar it appends."""
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(700)}}
    with pytest.raises(InvalidRequest, match=r"^response_format: the grammar is too large") as e:
        compiler.compile(GrammarSpec.json_schema(wide))
    assert e.value.param == "response_format" and "<state>" not in e.value.message and len(e.value.message) < 500
    many = [f"choice number {i}" for i in range(20000)]
    with pytest.raises(InvalidRequest, match=r"^guided_choice: the grammar is too large"):
        compiler.compile(GrammarSpec.choice(many))
    compiler.compile(GrammarSpec.json_schema({"type": "object", "properties": {f"p{i}": {"type": "string"}
                                                                               for i in range(50)}}))
    # the engine's mid-generation check classifies the parser's own message the same way (a limit, not a bad token)
    from autoglm.engine.grammar import CompiledGrammar, _llguidance_grammar, is_limit_error, short_error

    spec = GrammarSpec.json_schema(wide)
    state = CompiledGrammar(spec, _llguidance_grammar(spec), compiler._tokenizer, compiler.vocab_size).new_state()
    assert not state.accept(tok.encode('{"', add_special_tokens=False)[0]) and state.error is not None
    assert is_limit_error(state.error) and "<state>" in state.error and "<state>" not in short_error(state.error)
    ok = compiler.compile(GrammarSpec.json_schema({"type": "object"})).new_state()
    assert not ok.accept(tok.encode("x", add_special_tokens=False)[0]) and not is_limit_error(ok.error or "")
