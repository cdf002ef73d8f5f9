"""Request fields that constrain the output -> one GrammarSpec (or None).

Accepted names: OpenAI `response_format` (`text`, `json_object`, `json_schema` with `schema` and `strict`); vLLM's
`structured_outputs` object (`json`, `regex`, `choice`, `grammar`, `json_object`) and its older top-level
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`; Ollama's `format` ("json" or a schema). At most
one constraint per request: two -> InvalidRequest naming both. Anything we cannot honour (`structural_tag`, an
unknown `response_format.type`) -> InvalidRequest, never ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from autoglm.engine.grammar import GrammarSpec
from autoglm.errors import InvalidRequest


def _from_response_format(rf: Any) -> GrammarSpec | None:
    if rf is None:
        return None
    if not isinstance(rf, Mapping):
        raise InvalidRequest("response_format must be an object", param="response_format")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec.json_object("response_format")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, Mapping) or "schema" not in js:
            raise InvalidRequest("response_format.json_schema.schema is required for type 'json_schema'",
                                 param="response_format.json_schema.schema")
        # strict or not, the schema is enforced: a grammar cannot follow a schema "loosely"
        return GrammarSpec.json_schema(js["schema"], "response_format.json_schema.schema")
    raise InvalidRequest(f"response_format.type {kind!r} is not supported (use 'text', 'json_object' or "
                         "'json_schema')", param="response_format.type")


def _from_structured_outputs(so: Any, param: str) -> list[GrammarSpec]:
    if so is None:
        return []
    if not isinstance(so, Mapping):
        raise InvalidRequest(f"{param} must be an object", param=param)
    out: list[GrammarSpec] = []
    for key, value in so.items():
        if value is None or value is False:
            continue
        where = f"{param}.{key}"
        if key == "json":
            out.append(GrammarSpec.json_schema(value, where))
        elif key == "json_object":
            out.append(GrammarSpec.json_object(where))
        elif key == "regex":
            out.append(GrammarSpec.regex(value, where))
        elif key == "choice":
            out.append(GrammarSpec.choice(value, where))
        elif key == "grammar":
            out.append(GrammarSpec.grammar(value, where))
        elif key in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties",
                     "whitespace_pattern"):
            continue  # vLLM backend tuning knobs: our backend has one behaviour (compact JSON, no fallback)
        else:
            raise InvalidRequest(f"{where} is not supported (supported: json, json_object, regex, choice, grammar)",
                                 param=where)
    return out


def structured_output_spec(
    *,
    response_format: Any = None,
    structured_outputs: Any = None,
    guided_json: Any = None,
    guided_regex: Any = None,
    guided_choice: Any = None,
    guided_grammar: Any = None,
    ollama_format: Any = None,
) -> GrammarSpec | None:
    """The one output constraint of a request (None: free text). Pass the request's fields as they arrived."""
    specs: list[GrammarSpec] = []
    if (rf := _from_response_format(response_format)) is not None:
        specs.append(rf)
    specs += _from_structured_outputs(structured_outputs, "structured_outputs")
    if guided_json is not None:
        specs.append(GrammarSpec.json_schema(guided_json, "guided_json"))
    if guided_regex is not None:
        specs.append(GrammarSpec.regex(guided_regex, "guided_regex"))
    if guided_choice is not None:
        specs.append(GrammarSpec.choice(guided_choice, "guided_choice"))
    if guided_grammar is not None:
        specs.append(GrammarSpec.grammar(guided_grammar, "guided_grammar"))
    if ollama_format is not None and ollama_format != "":
        if ollama_format == "json":
            specs.append(GrammarSpec.json_object("format"))
        elif isinstance(ollama_format, Mapping):
            specs.append(GrammarSpec.json_schema(ollama_format, "format"))
        else:
            raise InvalidRequest("format must be \"json\" or a JSON schema object", param="format")
    if len(specs) > 1:
        names = ", ".join(s.param for s in specs)
        raise InvalidRequest(f"only one output constraint may be given per request, got: {names}",
                             param=specs[1].param)
    return specs[0] if specs else None
