"""Pydantic models of the OpenAI wire formats we accept (API_NOTES §2).

Requests are validated here; a validation failure becomes an OpenAI-shaped 400 in `errors_http`. Unknown keys are
allowed (vLLM ignores and logs them) and reported by `unknown_keys()` so the route can log them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from autoglm.engine.grammar import GrammarSpec
from autoglm.engine.sampling_params import SamplingParams
from autoglm.engine.structured_output import structured_output_spec
from autoglm.errors import InvalidRequest

# Template variables the server sets itself: a client passing them in chat_template_kwargs would override the
# conversation or the special tokens, so they are refused (vLLM passes them through).
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "add_generation_prompt", "tools", "documents", "continue_final_message", "bos_token", "eos_token",
    "pad_token", "unk_token", "raise_exception", "strftime_now", "tojson",
})
MAX_N = 16  # choices per request (each is one engine sequence sharing the prompt's cached blocks)


def find_lone_surrogate(value: Any, path: str = "") -> str | None:
    """The JSON path of the first string holding a lone UTF-16 surrogate (JSON "\\ud800" decodes to one; it is no
    character, so no tokenizer or UTF-8 encoder takes it), or None."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where or "body"
        elif isinstance(item, dict):
            for k, v in item.items():
                if isinstance(k, str):
                    stack.append((k, where))
                stack.append((v, f"{where}.{k}" if where else str(k)))
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
    return None


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = find_lone_surrogate(data) if isinstance(data, dict) else None
        if where is not None:
            raise InvalidRequest(f"{where}: text contains a lone UTF-16 surrogate, which is not valid Unicode",
                                 param=where)
        return data

    def unknown_keys(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


# --- message content parts -------------------------------------------------------------------------------------
class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str
    detail: str | None = None


class ImageURLPart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_string(cls, value: Any) -> Any:
        # Some clients send `"image_url": "data:..."` instead of `{"url": ...}`.
        return {"url": value} if isinstance(value, str) else value


class InputAudio(_Lenient):
    data: str
    format: str = "wav"


class InputAudioPart(_Lenient):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImageURLPart | InputAudioPart, Field(discriminator="type")]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None  # accepted on assistant history (llama.cpp / DeepSeek name)
    reasoning: str | None = None  # accepted on assistant history (vLLM / Ollama name)
    tool_calls: list[dict[str, Any]] | None = None  # assistant history: the calls it made
    tool_call_id: str | None = None  # role "tool": which call this result answers

    def to_engine(self) -> dict[str, Any]:
        """The OpenAI-style dict `build_chat_prompt` takes ("developer" is a system turn for chat templates)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        if isinstance(self.content, list):
            out["content"] = [part.model_dump(exclude_none=True) for part in self.content]
        else:
            out["content"] = self.content if self.content is not None else ""
        reasoning = self.reasoning_content if self.reasoning_content is not None else self.reasoning
        if reasoning is not None:
            out["reasoning_content"] = reasoning
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls is not None:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class StreamOptions(_Lenient):
    include_usage: bool = False


# --- requests --------------------------------------------------------------------------------------------------
class _SamplingFields(_Lenient):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, like OpenAI) -> bias in [-100, 100]
    # structured outputs (engine/structured_output.py maps them to one grammar)
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM: json / json_object / regex / choice / grammar
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def output_spec(self) -> GrammarSpec | None:
        """The request's structured-output constraint (None: free text); a bad one -> InvalidRequest."""
        return structured_output_spec(
            response_format=self.response_format, structured_outputs=self.structured_outputs,
            guided_json=self.guided_json, guided_regex=self.guided_regex, guided_choice=self.guided_choice,
            guided_grammar=self.guided_grammar,
        )

    def check_n(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise InvalidRequest(f"n must be between 1 and {MAX_N}, got n={self.n}", param="n")

    def base_sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=[s for s in stop if s],
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias=self._logit_bias(),
        )
        params.validate()
        return params

    def _logit_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        try:
            return {int(k): float(v) for k, v in self.logit_bias.items()}
        except ValueError:
            raise InvalidRequest(
                f"logit_bias keys must be token ids, got {sorted(self.logit_bias)[:3]}", param="logit_bias"
            ) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    return_reasoning: bool | None = None
    reasoning_format: str | None = None
    # Tool calling and structured outputs (server/constraints.py validates and compiles them).
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None  # "auto" (default with tools) | "none" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _no_reserved_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        bad = sorted(set(value or {}) & RESERVED_TEMPLATE_KWARGS)
        if bad:
            raise InvalidRequest(
                f"chat_template_kwargs may not set {', '.join(bad)}: the server sets "
                f"{'it' if len(bad) == 1 else 'them'} from the request itself", param="chat_template_kwargs"
            )
        return value

    def thinking(self) -> bool | None:
        """`enable_thinking`, top level or in `chat_template_kwargs` (top level wins)."""
        if self.enable_thinking is not None:
            return self.enable_thinking
        value = (self.chat_template_kwargs or {}).get("enable_thinking")
        return None if value is None else bool(value)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_params(self) -> SamplingParams:
        self.check_n()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs=true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.base_sampling(self.requested_max_tokens(), logprobs)


class CompletionRequest(_SamplingFields):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[StrictInt], Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[Annotated[list[StrictInt], Field(min_length=1)]], Field(min_length=1)]
    )
    max_tokens: int | None = 16  # OpenAI's default for /v1/completions
    logprobs: int | None = None  # legacy API: number of top alternatives
    echo: bool = False
    suffix: str | None = None

    def single_prompt(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise InvalidRequest("only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list) and not prompt or prompt == "":
            raise InvalidRequest("prompt must not be empty", param="prompt")
        return prompt  # type: ignore[return-value]

    def sampling_params(self) -> SamplingParams:
        self.check_n()
        if self.echo:
            raise InvalidRequest("echo is not supported", param="echo")
        if self.suffix:
            raise InvalidRequest("suffix is not supported", param="suffix")
        return self.base_sampling(self.max_tokens, self.logprobs)
