"""`POST /v1/audio/transcriptions` and `/v1/audio/translations` (OpenAI's multipart API, vLLM's `usage`).

Fields: `file` (required), `model`, `language`, `prompt`, `response_format` (json | text | srt | verbose_json | vtt),
`temperature`, `timestamp_granularities[]` (segment). The file is decoded by content (autoglm.multimodal.audio) with
the `--max-audio-bytes` (413) and `--max-audio-file-seconds` (400) caps; longer-than-one-window files are windowed
by the recognizer itself (Whisper: 30 s seeks; CTC: overlapping 15 s windows), so nothing is split here.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import FormData, UploadFile

from autoglm.errors import InvalidRequest, MediaError, MediaTooLarge, ModelNotFound, UnsupportedModality
from autoglm.server.errors_http import REQUEST_ID_HEADER, request_id_of
from autoglm.server.speech_service import SpeechRequest, SpeechService
from autoglm.server.state import ServerState, get_state
from autoglm.speech import formats

log = logging.getLogger("autoglm.server")

_GRANULARITIES = ("segment", "word")
_KNOWN_FIELDS = {"file", "model", "language", "prompt", "response_format", "temperature",
                 "timestamp_granularities[]", "timestamp_granularities"}


def _authorized(request: Request) -> None:
    get_state(request).check_api_key(request)


router = APIRouter(prefix="/v1/audio", dependencies=[Depends(_authorized)])


@router.post("/transcriptions", response_model=None)
async def transcriptions(request: Request) -> Response:
    return await _handle(request, "transcribe")


@router.post("/translations", response_model=None)
async def translations(request: Request) -> Response:
    return await _handle(request, "translate")


async def _handle(request: Request, task: str) -> Response:
    state = get_state(request)
    rid = request_id_of(request)
    service = _service(state)
    form = await _form(request)
    try:
        _check_model(state, service, _text(form, "model"))
        fmt = formats.check_format(_text(form, "response_format"))
        temperature = _temperature(_text(form, "temperature"))
        grains = [str(g) for g in form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")]
        for g in grains:
            if g not in _GRANULARITIES:
                raise InvalidRequest(f"timestamp_granularities: {g!r} is not one of segment, word",
                                     param="timestamp_granularities")
        if "word" in grains:
            raise InvalidRequest("word timestamps are not supported by this server (segment timestamps are)",
                                 param="timestamp_granularities")
        if task == "translate" and not service.supports_translation:
            raise InvalidRequest(f"the speech module {service.name} cannot translate (transcriptions only)",
                                 param="model")
        unknown = sorted(k for k in form.keys() if k not in _KNOWN_FIELDS)
        if unknown:
            log.info("request %s: ignoring unknown field(s) %s", rid, ", ".join(unknown))
        data = await _file_bytes(form, service.file_limits.max_bytes)
    finally:
        await form.close()
    samples = await asyncio.to_thread(service.file_limits.decode, data, param="file")
    speech = SpeechRequest(
        language=_text(form, "language") or None, task=task, prompt=_text(form, "prompt") or None,
        temperature=temperature, timestamps=formats.needs_timestamps(fmt) or bool(grains),
    )  # fmt: skip
    result = await service.transcribe(samples, speech)
    body, content_type = formats.render(result, fmt, task=task, temperature=temperature)
    headers = {REQUEST_ID_HEADER: rid}
    if isinstance(body, dict):
        return JSONResponse(body, headers=headers)
    return Response(body, media_type=content_type, headers=headers)


def _service(state: ServerState) -> SpeechService:
    service: SpeechService | None = state.speech
    if service is None:
        reason = state.speech_unavailable or "no speech module is loaded"
        raise UnsupportedModality(f"/v1/audio needs a speech module: {reason}", param="model")
    return service


async def _form(request: Request) -> FormData:
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise InvalidRequest(f"expected a multipart/form-data body with a `file` field, got content type {ctype!r}")
    try:
        return await request.form(max_files=1, max_fields=64)
    except Exception as exc:  # malformed multipart: starlette raises its own HTTPException / parser errors
        detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        raise InvalidRequest(f"malformed multipart/form-data body: {detail}") from exc


def _text(form: FormData, key: str) -> str:
    value = form.get(key)
    return value.strip() if isinstance(value, str) else ""


def _check_model(state: ServerState, service: SpeechService, requested: str) -> None:
    # served names and the speech module's own name; "whisper-1" so OpenAI clients work unchanged
    if requested and requested not in (*state.served_names, service.name, "whisper-1"):
        raise ModelNotFound(f"The model `{requested}` does not exist.")


def _temperature(text: str) -> float:
    if not text:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise InvalidRequest(f"temperature must be a number, got {text!r}", param="temperature") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise InvalidRequest(f"temperature must be between 0 and 1, got {text}", param="temperature")
    return value


async def _file_bytes(form: FormData, max_bytes: int) -> bytes:
    upload: Any = form.get("file")
    if upload is None:
        raise InvalidRequest("the `file` field is required (the audio file to transcribe)", param="file")
    if not isinstance(upload, UploadFile):
        raise MediaError("the `file` field must be a file upload, not a text value", param="file")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise MediaTooLarge(f"audio file too large: over {max_bytes} bytes (the limit is {max_bytes} bytes)",
                            param="file")
    return data
