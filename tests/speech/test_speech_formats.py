"""Transcription response bodies (OpenAI / vLLM shapes) and the timestamp-segment parser."""

from __future__ import annotations

import json

import pytest

from autoglm.errors import InvalidRequest
from autoglm.speech.formats import needs_timestamps, render
from autoglm.speech.recognizer import Segment, Transcription

T = Transcription(
    text="Hello there. 你好。", language="en", duration=3.21,
    segments=[
        Segment(0.0, 1.5, " Hello there.", [2425, 456], -0.2, 0.01),
        Segment(1.5, 3661.25, " 你好。", [1], -0.3, 0.02),
    ],
    num_tokens=9,
)


def test_json_and_text() -> None:
    body, ctype = render(T, "json")
    assert body == {"text": "Hello there. 你好。", "usage": {"type": "duration", "seconds": 4}}
    assert ctype == "application/json"
    body, ctype = render(T, "text")
    assert body == "Hello there. 你好。\n" and ctype.startswith("text/plain")


def test_srt_and_vtt_cues() -> None:
    srt, _ = render(T, "srt")
    assert srt == "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n00:00:01,500 --> 01:01:01,250\n你好。\n"
    vtt, ctype = render(T, "vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n")
    assert ctype.startswith("text/vtt")
    no_segments = Transcription(text="Hi.", duration=2.0)
    assert render(no_segments, "srt")[0] == "1\n00:00:00,000 --> 00:00:02,000\nHi.\n"


def test_verbose_json_shape() -> None:
    body, _ = render(T, "verbose_json", task="translate", temperature=0.2)
    assert isinstance(body, dict)
    json.dumps(body)
    assert body["task"] == "translate" and body["language"] == "english" and body["duration"] == 3.21
    seg = body["segments"][0]
    assert set(seg) == {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                        "compression_ratio", "no_speech_prob"}
    assert seg["tokens"] == [2425, 456] and seg["temperature"] == 0.2


def test_format_validation() -> None:
    with pytest.raises(InvalidRequest, match="response_format"):
        render(T, "xml")
    assert needs_timestamps("srt") and needs_timestamps("verbose_json") and not needs_timestamps("json")
