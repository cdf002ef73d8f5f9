"""Loading the speech module at start-up: `--speech-model PATH`, `--no-speech`, or the built-in Whisper base.

An explicit `--speech-model` that fails to load stops the server (the operator asked for it). The built-in default
that cannot be had (its packages missing) is a warning: the server runs without speech and says why in every
`input_audio` / /v1/audio/* refusal (`ServerState.speech_unavailable`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from autoglm.errors import ModelLoadError
from autoglm.models.loaded import ModuleInfo
from autoglm.multimodal.audio import AudioLimits
from autoglm.server.speech_service import SpeechService
from autoglm.server.state import ServerState

log = logging.getLogger("autoglm.server")

def default_speech_model_path() -> Path:
    """The built-in speech module's directory (`autoglm.builtins`: assembled once into the user cache, atomic,
    sha256-checked). Raises ModelLoadError naming the missing package."""
    from autoglm.builtins import SPEECH_CT2, builtin_path, default_builtin

    return builtin_path(default_builtin(SPEECH_CT2))


async def start_speech(state: ServerState, module_line: Callable[[ModuleInfo], str]) -> None:
    """Load the configured speech module into `state.speech` (or record why there is none)."""
    config = state.config
    if config.no_speech:
        state.speech_unavailable = "this server was started with --no-speech"
        return
    explicit = config.speech_model is not None
    try:
        path = Path(config.speech_model) if explicit else await asyncio.to_thread(default_speech_model_path)
    except ModelLoadError as exc:
        log.warning("No speech module: %s; serving without speech (input_audio and /v1/audio/* get 400)", exc)
        state.speech_unavailable = f"no speech module is loaded ({exc})"
        return
    from autoglm.speech.load import load_speech_model

    log.info("Loading speech module from %s", path)
    started = time.monotonic()
    loaded = await asyncio.to_thread(load_speech_model, path, device=config.device)
    loaded.info.load_seconds = loaded.info.load_seconds or time.monotonic() - started
    log.info("%s", module_line(loaded.info))
    state.speech = SpeechService(
        loaded.recognizer, loaded.info,
        chat_limits=AudioLimits(max_seconds=config.max_audio_seconds, max_bytes=config.max_audio_bytes),
        file_limits=AudioLimits(max_seconds=config.max_audio_file_seconds, max_bytes=config.max_audio_bytes),
        max_queue=config.max_speech_queue,
    )  # fmt: skip


def stop_speech(state: ServerState) -> None:
    if state.speech is not None:
        state.speech.close()
