"""The default server hears: an espeak-ng clip sent as a chat `input_audio` part to the server started with no
model and no speech flag (built-in Qwen2.5-Coder-0.5B-Instruct + built-in Whisper base) is transcribed, then
answered. Skipped when espeak-ng is absent.
"""

from __future__ import annotations

import base64
import re

import openai
import pytest

from tests.fixtures.server import ServerProcess
from tests.fixtures.speech import espeak_wav_bytes

QUESTION = "What is the capital of France?"


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_input_audio_chat_on_default_server(default_server: ServerProcess) -> None:
    wav = espeak_wav_bytes(QUESTION)
    if wav is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    client = openai.OpenAI(base_url=default_server.v1, api_key="EMPTY", max_retries=0, timeout=300)
    transcript = client.audio.transcriptions.create(model="whisper-1", file=("q.wav", wav, "audio/wav")).text
    assert {"capital", "france"} <= _words(transcript), transcript
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
    reply = client.chat.completions.create(model="autoglm-phone-9b", temperature=0.0, max_tokens=64,
                                           messages=[{"role": "user", "content": [audio]}])  # type: ignore[list-item]
    answer = reply.choices[0].message.content
    print(f"transcript: {transcript!r}\nanswer: {answer!r}")
    assert answer and answer.strip() and "<|" not in answer, answer
    text_reply = client.chat.completions.create(model="autoglm-phone-9b", temperature=0.0, max_tokens=64,
                                                messages=[{"role": "user", "content": transcript}])
    # The decoder saw exactly the transcript where the audio was.
    assert reply.usage is not None and text_reply.usage is not None
    assert reply.usage.prompt_tokens == text_reply.usage.prompt_tokens
