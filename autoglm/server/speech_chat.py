"""Chat `input_audio` parts on a text/vision decoder: transcribed by the speech module, inserted as text in place.

`{"type": "input_audio", "input_audio": {"data": base64 | data URL, "format": "wav"|"mp3"|...}}` becomes
`{"type": "text", "text": transcript}` at the same position, before the chat template runs. Clips are capped at
`--max-audio-seconds` (400 `Maximum clip duration (15s) exceeded`); all clips of one request are decoded off the
event loop and transcribed concurrently (the service batches them when its recognizer can).
"""

from __future__ import annotations

import asyncio
from typing import Any

from autoglm.errors import MediaError, UnsupportedModality
from autoglm.multimodal.audio import input_audio_bytes
from autoglm.server.speech_service import SpeechService
from autoglm.server.state import ServerState


def _audio_parts(messages: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [
        (m, p)
        for m, message in enumerate(messages)
        if isinstance(message.get("content"), list)
        for p, part in enumerate(message["content"])
        if isinstance(part, dict) and part.get("type") == "input_audio"
    ]


async def transcribe_audio_parts(messages: list[dict[str, Any]], state: ServerState) -> list[dict[str, Any]]:
    """-> the messages with every input_audio part replaced by its transcript (new lists; the input is unchanged).

    No audio parts: returned as is. No speech module: 400 naming why. Bad audio: 4xx naming the cause.
    """
    where = _audio_parts(messages)
    if not where:
        return messages
    service: SpeechService | None = state.speech
    if service is None:
        reason = state.speech_unavailable or "no speech module is loaded"
        raise UnsupportedModality(f"input_audio parts need a speech module: {reason}", param="messages")
    cap = state.config.limit_mm_per_prompt
    if len(where) > cap:  # each clip is a transcription: the same per-prompt media cap as images
        raise MediaError(f"At most {cap} audio clip(s) may be provided in one prompt.", param="messages")
    limits = service.chat_limits

    def decode(m: int, p: int) -> Any:
        return limits.decode(input_audio_bytes(messages[m]["content"][p].get("input_audio"), param="messages"),
                             param="messages")

    clips = [await asyncio.to_thread(decode, m, p) for m, p in where]  # one at a time: bounded CPU per request
    tasks = [asyncio.ensure_future(service.transcribe(c)) for c in clips]
    try:
        texts = await asyncio.gather(*tasks)
    finally:
        for t in tasks:  # one clip failed (or the client left): the others' queued work is dropped
            t.cancel()
    out = [dict(message) for message in messages]
    for (m, p), result in zip(where, texts, strict=True):
        content = list(out[m]["content"]) if out[m]["content"] is messages[m]["content"] else out[m]["content"]
        content[p] = {"type": "text", "text": result.text}
        out[m]["content"] = content
    return out


def capabilities(state: ServerState) -> list[str]:
    """What the served model does, for /v1/models: speech in is transcription in front of the decoder."""
    caps = ["chat", "completion"]
    model = state.model
    if model is not None and "image" in getattr(model, "encoders", {}):
        caps.append("vision")
    if state.speech is not None:
        caps += ["transcription", "audio_input"]
        if state.speech.supports_translation:
            caps.append("translation")
    return caps
