"""`WhisperRecognizer`: the SpeechRecognizer for Whisper checkpoints (HF safetensors or CTranslate2).

A file longer than 30 s is featurised once and decoded window by window (seek = 30 s without timestamps, or to the
last complete timestamp pair with them, as openai-whisper / faster-whisper do), each window conditioned on the text
decoded so far; windows judged silent (no-speech probability > 0.6 and mean log-prob < -1) are dropped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from autoglm.errors import InvalidRequest
from autoglm.models.whisper import WhisperForConditionalGeneration
from autoglm.multimodal.whisper_features import (
    FRAMES_PER_SECOND,
    HOP_LENGTH,
    N_FRAMES,
    log_mel_spectrogram,
    window_features,
)
from autoglm.speech.recognizer import SAMPLE_RATE, Segment, Transcription
from autoglm.speech.whisper_decoding import DecodeOptions, DecodeResult, decode_window, detect_language
from autoglm.speech.whisper_tokenizer import TIME_PRECISION, WhisperTokenizer

NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0
_TIMESTAMP_FRAMES = round(TIME_PRECISION * FRAMES_PER_SECOND)  # mel frames per timestamp token (2)


@dataclass
class WhisperRecognizer:
    """SpeechRecognizer over a loaded Whisper model (see autoglm.speech.recognizer for the contract)."""

    model: WhisperForConditionalGeneration
    tokenizer: WhisperTokenizer
    suppress_tokens: list[int]
    suppress_begin: list[int]
    name: str = "whisper"
    format: str = "safetensors"
    quantization: str = "float32"
    condition_on_previous_text: bool = True
    max_new_tokens: int = 448  # per 30 s window (capped by the decoder's positions)

    def __post_init__(self) -> None:
        self.multilingual = self.tokenizer.multilingual
        self.supports_translation = self.tokenizer.multilingual
        self._lock = threading.Lock()

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
        seed: int | None = None,
    ) -> Transcription:
        if task not in ("transcribe", "translate"):
            raise InvalidRequest(f"task must be 'transcribe' or 'translate', got {task!r}", param="task")
        if task == "translate" and not self.supports_translation:
            raise InvalidRequest("this Whisper model is English-only and cannot translate", param="model")
        if not 1 <= beam_size <= 16:
            raise InvalidRequest(f"beam_size must be between 1 and 16, got {beam_size}", param="beam_size")
        if not 0.0 <= temperature <= 2.0:
            raise InvalidRequest(f"temperature must be between 0 and 2, got {temperature}", param="temperature")
        if language is not None:
            language = language.strip().lower()
            if not self.multilingual:
                if language != "en":
                    raise InvalidRequest(f"this Whisper model is English-only (language {language!r})",
                                         param="language")
            elif language not in self.tokenizer.languages:
                raise InvalidRequest(f"unsupported language {language!r}", param="language")
        with self._lock, torch.inference_mode():
            return self._transcribe(samples, language, task, prompt, temperature, beam_size, timestamps, seed)

    def _transcribe(
        self, samples: np.ndarray, language: str | None, task: str, prompt: str | None, temperature: float,
        beam_size: int, timestamps: bool, seed: int | None,
    ) -> Transcription:
        tok = self.tokenizer
        duration = samples.shape[0] / SAMPLE_RATE
        if samples.shape[0] == 0:
            return Transcription(text="", language=language, duration=0.0)
        # Featurised once, padded by one hop (not 30 s): windows are zero-padded in the feature domain as
        # openai-whisper / faster-whisper do, so our greedy text matches theirs.
        features = log_mel_spectrogram(samples, self.model.config.num_mel_bins, padding=HOP_LENGTH)
        content = features.shape[1] - 1  # [n_mels, content + 1]
        # Past one window, decode with timestamps anyway (faster-whisper's default): without them Whisper tends to
        # stop early in a full 30 s window, and seeking to the last timestamp resumes mid-window.
        decode_ts = timestamps or content > N_FRAMES
        generator = torch.Generator().manual_seed(seed) if seed is not None and temperature > 0 else None
        opts = DecodeOptions(beam_size=beam_size, temperature=temperature, timestamps=decode_ts,
                             suppress_tokens=self.suppress_tokens, suppress_begin=self.suppress_begin,
                             generator=generator, max_new_tokens=self.max_new_tokens)
        previous: list[int] = tok.encode(" " + prompt.strip()) if prompt and prompt.strip() else []
        if not self.multilingual:
            language = "en"
        segments: list[Segment] = []
        n_tokens = 0
        seek = 0
        while seek < content:
            seg_frames = min(N_FRAMES, content - seek)
            if language is None:
                first = self.model.encode(window_features(features, 0)[None])
                language, _ = detect_language(self.model, tok, first)
            window = window_features(features, seek, seg_frames)[None]  # [1, n_mels, 3000]
            states = self.model.encode(window)
            head = [tok.sot_prev, *previous[-(self.model.config.max_target_positions // 2 - 1) :]] if previous else []
            sot_seq = tok.sot_sequence(language, task)
            prompt_ids = head + sot_seq + ([] if decode_ts else [tok.no_timestamps])
            result = decode_window(self.model, tok, states, prompt_ids, opts)
            n_tokens += len(result.tokens) + 1
            offset = seek / FRAMES_PER_SECOND
            if result.no_speech_prob > NO_SPEECH_THRESHOLD and result.avg_logprob < LOGPROB_THRESHOLD:
                seek += seg_frames  # a silent window: nothing said, nothing to condition on
                continue
            if decode_ts:
                new_segments, advance, kept = self._timestamped(result, offset, seg_frames)
            else:
                text = tok.decode(result.tokens)
                new_segments = [Segment(offset, offset + seg_frames / FRAMES_PER_SECOND, text, result.tokens,
                                        result.avg_logprob, result.no_speech_prob)] if text.strip() else []
                advance, kept = seg_frames, result.tokens
            segments.extend(new_segments)
            if self.condition_on_previous_text:
                previous = previous + kept
            seek += max(advance, 1)
        text = "".join(s.text for s in segments).strip()
        for s in segments:  # a timestamp token may point past the end of the audio
            s.start = min(s.start, duration)
            s.end = max(s.start, min(s.end, duration))
        return Transcription(text=text, language=language, duration=duration,
                             segments=segments if timestamps else [], num_tokens=n_tokens)

    def _timestamped(
        self, result: DecodeResult, offset: float, seg_frames: int
    ) -> tuple[list[Segment], int, list[int]]:
        """Split a window's tokens at timestamp pairs -> (segments, frames to seek, the tokens kept as context)."""
        tok = self.tokenizer
        ts = tok.timestamp_begin
        ids = result.tokens
        is_ts = [t >= ts for t in ids]
        ends_single = len(ids) >= 2 and is_ts[-1] and not is_ts[-2]
        cuts = [i for i in range(1, len(ids)) if is_ts[i] and is_ts[i - 1]]
        if ends_single:
            cuts.append(len(ids))
        segments: list[Segment] = []

        def seg(part: list[int]) -> Segment | None:
            stamps = [t for t in part if t >= ts]
            text = tok.decode(part)
            if not text.strip():
                return None
            start = (stamps[0] - ts) * TIME_PRECISION if stamps else 0.0
            end = (stamps[-1] - ts) * TIME_PRECISION if len(stamps) > 1 else seg_frames / FRAMES_PER_SECOND
            return Segment(offset + start, offset + end, text, [t for t in part if t < tok.eot],
                           result.avg_logprob, result.no_speech_prob)

        if cuts:
            last = 0
            for c in cuts:
                s = seg(ids[last:c])
                if s is not None:
                    segments.append(s)
                last = c
            if ends_single:
                advance, kept = seg_frames, ids
            else:
                # the window ended mid-segment: seek to the last complete timestamp and decode the rest again
                advance, kept = (ids[last - 1] - ts) * _TIMESTAMP_FRAMES, ids[:last]
        else:
            stamps = [t for t in ids if t >= ts]
            s = seg(ids)
            if s is not None:
                if stamps:
                    s.end = offset + (stamps[-1] - ts) * TIME_PRECISION if stamps[-1] != ts else s.end
                segments.append(s)
            advance, kept = seg_frames, ids
        return segments, advance, kept
