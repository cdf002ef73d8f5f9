"""A chat request's output constraints: its tools (rendered, parsed back) and its grammar (forced tool calls,
`response_format`, vLLM's `structured_outputs` / `guided_*`).

Per model, built once and lazily (the first request that needs it; building the grammar engine's token table takes
a second or so for a 150k vocabulary): the tool-call format the chat template teaches and one `GrammarCompiler`.
Per request, `ChatConstraints.build` validates everything before a byte is streamed, so any problem is a 400.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autoglm.engine.grammar import CompiledGrammar, GrammarCompiler, GrammarSpec
from autoglm.engine.tool_grammar import tool_call_grammar
from autoglm.errors import InvalidRequest
from autoglm.tokenizer.tool_calls import parameters_schema, tool_function, tool_functions
from autoglm.tokenizer.tool_history import messages_for_template
from autoglm.tokenizer.tool_parsers import ToolFormat, detect_tool_format

if TYPE_CHECKING:
    from autoglm.models.loaded import LoadedModel
    from autoglm.server.protocol import ChatCompletionRequest


class ModelConstraints:
    """The loaded model's tool format and grammar compiler (the compiler is built on first use, under a lock)."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        template = model.chat_template
        self.tool_format: ToolFormat | None = detect_tool_format(template.source if template else None,
                                                                 model.architecture)
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    @property
    def compiler(self) -> GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                self._compiler = GrammarCompiler(self.model.tokenizer, vocab_size=self.model.decoder.vocab_size,
                                                 eos_token_ids=self.model.eos_token_ids)
            return self._compiler

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Blocking (token table on first use, then the grammar): call off the event loop."""
        compiler = self.compiler
        with self._lock:  # the LRU cache is not thread-safe
            return compiler.compile(spec)


@dataclass
class ChatConstraints:
    """messages: ready for the template; tools: passed to the template (None: not rendered); tool_format: parses
    the reply into tool calls (None: plain content); grammar: the compiled constraint (None: free text)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    tool_format: ToolFormat | None
    grammar: CompiledGrammar | None
    keep_special_tokens: bool = False  # the format's markup is special tokens: detokenize with them kept

    @classmethod
    def build(cls, body: ChatCompletionRequest, mc: ModelConstraints, messages: list[dict[str, Any]]
              ) -> ChatConstraints:
        """An OpenAI chat request's constraints. Blocking; every problem -> InvalidRequest (400) naming the field."""
        return cls.make(mc, messages, tools=body.tools or None, tool_choice=body.tool_choice,
                        parallel_tool_calls=body.parallel_tool_calls is not False, output_spec=body.output_spec())

    @classmethod
    def make(cls, mc: ModelConstraints, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None,
             tool_choice: Any = None, parallel_tool_calls: bool = True, output_spec: GrammarSpec | None = None
             ) -> ChatConstraints:
        """Any surface's constraints (OpenAI's `build`, Ollama's /api/chat): OpenAI-style messages and tools, the
        OpenAI `tool_choice` (None: as "auto"), the structured-output spec. Blocking; problems -> InvalidRequest."""
        model = mc.model
        choice = _tool_choice(tool_choice)
        if tools is not None:
            tool_functions(tools)  # validate names / shapes
        if tools is None and choice not in (None, "none", "auto"):
            raise InvalidRequest(f"tool_choice {tool_choice!r} requires a call but the request has no tools",
                                 param="tool_choice")
        fmt = mc.tool_format if tools is not None and choice != "none" else None
        if tools is not None and choice not in (None, "none", "auto") and fmt is None:
            raise InvalidRequest(f"tool_choice {tool_choice!r}: model {model.name!r} has no tool-call format in "
                                 "its chat template", param="tool_choice")
        msgs = messages_for_template(messages, mc.tool_format)
        spec = None
        if fmt is not None:
            spec = tool_call_grammar(fmt, tools, choice, model.tokenizer, parallel_tool_calls=parallel_tool_calls)
        if spec is not None and output_spec is not None:
            raise InvalidRequest(f"tool_choice {tool_choice!r} and {output_spec.param} both constrain the output; "
                                 "send one", param=output_spec.param)
        try:
            grammar = mc.compile(spec or output_spec) if (spec or output_spec) is not None else None
        except InvalidRequest:
            if spec is not None and tools is not None:
                _blame_a_tool(mc, tools)  # a bad `parameters` schema is that tool's fault, not tool_choice's
            raise
        return cls(msgs, tools if choice != "none" else None, fmt, grammar, keeps_special_tokens(fmt, model))


def _blame_a_tool(mc: ModelConstraints, tools: list[dict[str, Any]]) -> None:
    """The call grammar did not compile: compile each tool's schema alone, raising the first failure under
    `tools[i].function.parameters`; returns when each compiles alone (the combined grammar is at fault)."""
    for i, tool in enumerate(tools):
        params = parameters_schema(tool_function(tool, i))
        mc.compile(GrammarSpec.json_schema(params, param=f"tools[{i}].function.parameters"))


def keeps_special_tokens(fmt: ToolFormat | None, model: LoadedModel) -> bool:
    """Whether replies parsed with `fmt` must be detokenized with special tokens kept (its markup is special
    tokens of this tokenizer, else `<tool_call>` would vanish before the parser sees it, as vLLM does)."""
    tok = model.tokenizer
    return fmt is not None and any(tok.token_to_id(tag) in tok.special_ids for tag in fmt.markup)


def _tool_choice(value: Any) -> Any:
    """OpenAI's spellings -> None / "none" / "auto" / "required" / {"type": "function", ...} as tool_grammar takes."""
    if value is None or value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict):
        return value
    raise InvalidRequest(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                         f"{{'name': ...}}}}, got {value!r}", param="tool_choice")
