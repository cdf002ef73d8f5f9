"""The phone-agent benchmark's request (benchmarks/phone_agent_request.py) has Open-AutoGLM's shape, and its
llama-server log parser reads clip time from log stamps."""

from __future__ import annotations

import io

from PIL import Image

from benchmarks.phone_agent import _encode_seconds
from benchmarks.phone_agent_request import ACTIONS, SYSTEM_PROMPT, conversation, screenshot


def _images(msgs: list[dict]) -> list[tuple[int, int]]:
    return [(i, j) for i, m in enumerate(msgs) if isinstance(m["content"], list)
            for j, p in enumerate(m["content"]) if p["type"] == "image_url"]  # fmt: skip


def test_screenshot_is_a_1080x2400_png_and_differs_per_step() -> None:
    a, b = screenshot(0), screenshot(1)
    assert Image.open(io.BytesIO(a)).size == (1080, 2400)
    assert a[:8] == b"\x89PNG\r\n\x1a\n" and a != b


def test_history_keeps_text_and_actions_but_only_the_newest_screenshot() -> None:
    shots = [screenshot(k) for k in range(4)]
    assert 3000 <= len(SYSTEM_PROMPT) <= 4000
    for step in range(4):
        msgs = conversation(step, shots)
        assert msgs[0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert [m["role"] for m in msgs[1:]] == ["user", "assistant"] * step + ["user"]
        assert _images(msgs) == [(len(msgs) - 1, 0)]  # one image, first part of the last user turn
        assert [m["content"] for m in msgs if m["role"] == "assistant"] == ACTIONS[:step]
        # the prefix before the previous user turn repeats exactly from step to step
        if step:
            prev = conversation(step - 1, shots)
            assert msgs[: len(prev) - 1] == prev[:-1]


def test_encode_seconds_pairs_clip_start_with_first_image_batch() -> None:
    log = (
        "0.04.997.229 I slot process_mtmd: id  0 | task 0 | encoding mtmd batch from idx = 1578, n_chunks = 1\n"
        "0.10.801.278 I decoding image batch 1/2, n_tokens_batch = 2048\n"
        "0.14.277.350 I decoding image batch 2/2, n_tokens_batch = 1306\n"
        "1.18.000.000 I slot process_mtmd: id  0 | task 18 | encoding mtmd batch from idx = 1668, n_chunks = 1\n"
        "1.20.500.000 I decoding image batch 1/1, n_tokens_batch = 900\n"
    )
    got = _encode_seconds(log)
    assert [round(x, 6) for x in got] == [5.804049, 2.5]
