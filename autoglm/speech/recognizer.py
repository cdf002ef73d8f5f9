"""The one interface every speech module (Whisper, CTC Conformer, ONNX or PyTorch) sits behind.

A recognizer takes 16 kHz mono float32 samples (decoded and resampled by `autoglm.multimodal.audio`) and returns a
`Transcription`. The server's `/v1/audio/transcriptions` and chat `input_audio` parts both go through it; a
recognizer is loaded by content (`autoglm.speech.load`), never by file name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

SAMPLE_RATE = 16_000


@dataclass
class Segment:
    """A stretch of the transcription with times in seconds from the start of the clip."""

    start: float
    end: float
    text: str
    token_ids: list[int] = field(default_factory=list)
    avg_logprob: float | None = None
    no_speech_prob: float | None = None


@dataclass
class Transcription:
    text: str
    language: str | None = None  # ISO 639-1 code ("en", "zh") when known or detected
    duration: float = 0.0  # seconds of audio
    segments: list[Segment] = field(default_factory=list)  # filled when timestamps were asked for
    num_tokens: int = 0  # tokens generated (usage)


@runtime_checkable
class SpeechRecognizer(Protocol):
    """name: short module name for logs; format: "ct2" | "safetensors" | "onnx"; quantization: "int8", "float32", ...

    transcribe(samples [N] float32 at 16 kHz) -> Transcription. `language` None = detect (when the model can);
    `task` "transcribe" | "translate" (translate: into English, Whisper only; others raise InvalidRequest);
    `prompt` is previous-context text (Whisper) and may be ignored by models without one; `timestamps` asks for
    `segments` with times. Must be thread-safe for one caller at a time (the server serializes or batches calls).
    """

    name: str
    format: str
    quantization: str
    multilingual: bool
    supports_translation: bool

    def transcribe(
        self,
        samples: np.ndarray,
        *,
        language: str | None = None,
        task: str = "transcribe",
        prompt: str | None = None,
        temperature: float = 0.0,
        beam_size: int = 1,
        timestamps: bool = False,
    ) -> Transcription: ...
