"""Where a reply's reasoning goes on the wire: API_NOTES §2's thinking table, streaming and non-streaming alike.

The engine hands us `reasoning_delta` and `content_delta` (split on token ids; tag tokens already dropped). A
`ReasoningFormatter` turns them into the `content` and `reasoning` text of one wire delta:

| mode       | content                                | reasoning_content + reasoning |
|------------|----------------------------------------|-------------------------------|
| merged     | reasoning + answer (vLLM, no parser)   | absent                        |
| separate   | answer                                 | the reasoning                 |
| hidden     | answer                                 | absent                        |
| inline     | `<think>reasoning</think>answer`       | absent                        |
"""

from __future__ import annotations

from dataclasses import dataclass

from autoglm.errors import InvalidRequest

# Per-request `reasoning_format` values, including llama.cpp's names for the same placements.
_ALIASES = {
    "merged": "merged",
    "separate": "separate",
    "parsed": "separate",
    "deepseek": "separate",
    "deepseek-legacy": "separate",
    "hidden": "hidden",
    "inline": "inline",
    "none": "inline",  # llama.cpp: thoughts left in content with their tags
}


def resolve_mode(
    server_default: str,
    *,
    reasoning_format: str | None = None,
    return_reasoning: bool | None = None,
    enable_thinking: bool | None = None,
) -> str:
    """The request's mode. Precedence: `reasoning_format` > `return_reasoning` > `enable_thinking: false` >
    the server's `--reasoning-format`."""
    if reasoning_format is not None:
        mode = _ALIASES.get(reasoning_format.strip().lower())
        if mode is None:
            raise InvalidRequest(
                f"reasoning_format must be one of {', '.join(sorted(_ALIASES))}, got {reasoning_format!r}",
                param="reasoning_format",
            )
        return mode
    if return_reasoning is not None:
        return "separate" if return_reasoning else "hidden"
    if enable_thinking is False:
        return "hidden"  # the model was not asked to think; only the answer is content
    return server_default


@dataclass
class FormattedDelta:
    content: str
    reasoning: str | None  # None: the reasoning fields are absent from the wire


class ReasoningFormatter:
    """Stateful per request: `inline` must open `<think>` once and close it when the answer starts."""

    def __init__(self, mode: str) -> None:
        if mode not in ("merged", "separate", "hidden", "inline"):
            raise ValueError(f"unknown reasoning mode {mode!r}")
        self.mode = mode
        self._think_open = False

    def feed(self, reasoning_delta: str, content_delta: str) -> FormattedDelta:
        if self.mode == "merged":
            return FormattedDelta(reasoning_delta + content_delta, None)
        if self.mode == "separate":
            return FormattedDelta(content_delta, reasoning_delta)
        if self.mode == "hidden":
            return FormattedDelta(content_delta, None)
        # inline
        text = ""
        if reasoning_delta:
            if not self._think_open:
                text += "<think>"
                self._think_open = True
            text += reasoning_delta
        if content_delta:
            if self._think_open:
                text += "</think>"
                self._think_open = False
            text += content_delta
        return FormattedDelta(text, None)

    def finish(self) -> FormattedDelta:
        """Close an inline `<think>` left open (reasoning cut off by max_tokens)."""
        if self.mode == "inline" and self._think_open:
            self._think_open = False
            return FormattedDelta("</think>", None)
        return FormattedDelta("", None if self.mode != "separate" else "")

    @property
    def emits_reasoning(self) -> bool:
        return self.mode == "separate"
