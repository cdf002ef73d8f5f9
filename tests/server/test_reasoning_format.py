"""API_NOTES §2's thinking table, on the formatter that every route uses (streamed and whole replies alike)."""

from __future__ import annotations

import pytest

from autoglm.errors import InvalidRequest
from autoglm.server.reasoning_format import ReasoningFormatter, resolve_mode

# A reply as the engine streams it: (reasoning_delta, content_delta) pairs.
STREAM = [("Let me ", ""), ("think.", ""), ("", "The "), ("", "answer.")]
REASONING = "Let me think."
ANSWER = "The answer."


def _run(mode: str, stream: list[tuple[str, str]]) -> tuple[str, str | None]:
    formatter = ReasoningFormatter(mode)
    content, reasoning = "", None
    for r, c in [*stream]:
        delta = formatter.feed(r, c)
        content += delta.content
        if delta.reasoning is not None:
            reasoning = (reasoning or "") + delta.reasoning
    content += formatter.finish().content
    return content, reasoning


@pytest.mark.parametrize(
    ("mode", "content", "reasoning"),
    [
        ("merged", REASONING + ANSWER, None),
        ("separate", ANSWER, REASONING),
        ("hidden", ANSWER, None),
        ("inline", f"<think>{REASONING}</think>{ANSWER}", None),
    ],
)
def test_table(mode: str, content: str, reasoning: str | None) -> None:
    assert _run(mode, STREAM) == (content, reasoning)


def test_inline_closes_think_when_reasoning_is_cut_off() -> None:
    assert _run("inline", [("partial thou", ""), ("ght", "")]) == ("<think>partial thought</think>", None)


def test_request_fields_resolve_to_modes() -> None:
    assert resolve_mode("merged") == "merged"
    assert resolve_mode("merged", return_reasoning=True) == "separate"
    assert resolve_mode("merged", return_reasoning=False) == "hidden"
    assert resolve_mode("merged", reasoning_format="inline", return_reasoning=True) == "inline"
    assert resolve_mode("merged", enable_thinking=False) == "hidden"
    assert resolve_mode("inline", enable_thinking=True) == "inline"
    assert resolve_mode("merged", reasoning_format="deepseek") == "separate"
    with pytest.raises(InvalidRequest, match="reasoning_format"):
        resolve_mode("merged", reasoning_format="sideways")
