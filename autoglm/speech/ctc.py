"""CTC speech recognition: greedy decoding, detokenization, and `CTCRecognizer` (a `SpeechRecognizer`).

The recognizer is the same for every CTC acoustic model (our PyTorch FastConformer, an ONNX export run by
onnxruntime): features (`autoglm.multimodal.fbank.FeatureRecipe`) -> log-probs -> greedy path -> text. Clips longer
than `window_seconds` (15 s, the article's limit) are cut into overlapping windows; each window keeps the frames
of its middle part, so the frame sequences join without duplicated or dropped words, and one CTC collapse runs
over the joined path.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from autoglm.errors import InvalidRequest, MediaError, ModelLoadError
from autoglm.multimodal.fbank import FeatureRecipe
from autoglm.speech.recognizer import SAMPLE_RATE, Segment, Transcription

SPACE = "\u2581"  # sentencepiece's word-start marker
_SPECIAL = ("<unk>", "<blk>", "<blank>", "<pad>", "<s>", "</s>", "<sos/eos>", "<eps>")


class CTCAcousticModel(Protocol):
    """An acoustic model with a CTC head.

    log_probs(features [B, T, bins] float32, lengths [B] int64) -> (log-probs [B, T', vocab] float32 numpy,
    output lengths [B] int64 numpy); T' = about T / subsampling_factor. Rows past a clip's length are unspecified.
    """

    name: str
    format: str
    quantization: str
    subsampling_factor: int

    def log_probs(self, features: Tensor, lengths: Tensor) -> tuple[np.ndarray, np.ndarray]: ...


def ctc_greedy(log_probs: np.ndarray, blank_id: int) -> tuple[list[int], list[int]]:
    """[T, vocab] scores -> (token ids, the frame each one starts at): argmax, collapse repeats, drop blanks."""
    if log_probs.shape[0] == 0:
        return [], []
    best = log_probs.argmax(axis=-1)
    return collapse(best, blank_id)


def collapse(best: np.ndarray, blank_id: int) -> tuple[list[int], list[int]]:
    """A frame-level best path [T] -> (ids, start frames): a token repeats only across a blank."""
    keep = np.ones(best.shape[0], dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    keep &= best != blank_id
    frames = np.nonzero(keep)[0]
    return best[frames].tolist(), frames.tolist()


class CTCVocab:
    """Token id -> text. Either an HF `tokenizer.json` (decoded by `tokenizers`) or a sentencepiece-style piece list
    (sherpa-onnx `tokens.txt`, ONNX metadata): pieces joined, `▁` -> space, `<0xNN>` byte pieces as bytes."""

    def __init__(self, *, pieces: Sequence[str] | None = None, tokenizer: object | None = None, size: int) -> None:
        self.pieces = list(pieces) if pieces is not None else None
        self.tokenizer = tokenizer
        self.size = size

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> CTCVocab:
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ModelLoadError(f"{path}: cannot read the tokenizer ({e})") from e
        return cls(tokenizer=tok, size=tok.get_vocab_size(with_added_tokens=True))

    @classmethod
    def from_tokens_txt(cls, path: str | Path) -> CTCVocab:
        """sherpa-onnx `tokens.txt`: one `piece id` per line (ids dense from 0)."""
        table: dict[int, str] = {}
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            piece, _, idx = line.rpartition(" ")
            if not idx.isdigit():
                raise ModelLoadError(f"{path}:{n}: expected `piece id`, got {line!r}")
            table[int(idx)] = piece if piece else " "
        if sorted(table) != list(range(len(table))):
            raise ModelLoadError(f"{path}: token ids are not 0..{len(table) - 1}")
        return cls.from_pieces([table[i] for i in range(len(table))])

    @classmethod
    def from_pieces(cls, pieces: Sequence[str]) -> CTCVocab:
        return cls(pieces=pieces, size=len(pieces))

    def find(self, *candidates: str) -> int | None:
        """Id of the first candidate token present, else None."""
        for c in candidates:
            if self.pieces is not None and c in self.pieces:
                return self.pieces.index(c)
            if self.tokenizer is not None and (i := self.tokenizer.token_to_id(c)) is not None:  # type: ignore[attr-defined]
                return int(i)
        return None

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is not None:
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=True)).strip()  # type: ignore[attr-defined]
        assert self.pieces is not None
        out = bytearray()
        for i in ids:
            p = self.pieces[i]
            if p in _SPECIAL:
                continue
            if len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
                out.append(int(p[3:5], 16))
            else:
                out += p.encode("utf-8")
        return out.decode("utf-8", errors="replace").replace(SPACE, " ").strip()

    def to_json(self) -> str:
        """The piece list as JSON (embedded in exported ONNX metadata as `vocab`)."""
        if self.pieces is not None:
            return json.dumps(self.pieces, ensure_ascii=False)
        tok = self.tokenizer
        assert tok is not None
        return json.dumps([tok.id_to_token(i) or "" for i in range(self.size)], ensure_ascii=False)  # type: ignore[attr-defined]


@dataclass
class _Window:
    clip: int  # index of the clip in the batch
    start: int  # first sample
    keep_from: int  # first encoder frame (window-relative) whose output is kept
    keep_to: int | None  # one past the last kept frame; None = to the end


class CTCRecognizer:
    """`SpeechRecognizer` over a CTC acoustic model: greedy decoding, no language id, no translation.

    `window_seconds` bounds one forward pass; longer clips are windowed with `overlap_seconds` shared between
    neighbours (half of it dropped from each side of a seam). `max_batch` windows run per forward pass.
    """

    multilingual = False
    supports_translation = False

    def __init__(
        self,
        model: CTCAcousticModel,
        features: FeatureRecipe,
        vocab: CTCVocab,
        *,
        blank_id: int,
        window_seconds: float = 15.0,
        overlap_seconds: float = 2.0,
        max_batch: int = 8,
        language: str | None = None,
    ) -> None:
        if features.sample_rate != SAMPLE_RATE:
            raise ModelLoadError(f"{model.name}: features at {features.sample_rate} Hz; recognizers take {SAMPLE_RATE}")
        if not 0 <= blank_id < vocab.size:
            raise ModelLoadError(f"{model.name}: CTC blank id {blank_id} outside the vocabulary ({vocab.size})")
        self.model, self.features, self.vocab, self.blank_id = model, features, vocab, blank_id
        self.name, self.format, self.quantization = model.name, model.format, model.quantization
        self.language = language
        self.max_batch = max_batch
        # windows start on encoder-frame boundaries so their frames line up with the whole clip's
        self.frame_samples = features.hop_samples * model.subsampling_factor
        self.window = max(
            self.frame_samples, int(window_seconds * SAMPLE_RATE) // self.frame_samples * self.frame_samples
        )
        half = int(overlap_seconds * SAMPLE_RATE / 2) // self.frame_samples
        self.half_overlap_frames = min(half, self.window // self.frame_samples // 4)

    @property
    def frame_seconds(self) -> float:
        return self.frame_samples / SAMPLE_RATE

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
    ) -> Transcription:
        """`SpeechRecognizer.transcribe`; `prompt`, `temperature` and `beam_size` do not apply to greedy CTC."""
        return self.transcribe_batch([samples], task=task, timestamps=timestamps)[0]

    def transcribe_batch(
        self, clips: Sequence[np.ndarray], *, task: str = "transcribe", timestamps: bool = False
    ) -> list[Transcription]:
        """Several clips in shared forward passes; same results as one at a time."""
        if task != "transcribe":
            raise InvalidRequest(f"task {task!r}: this speech module only transcribes", param="task")
        arrays = [self._check(c) for c in clips]
        windows = [w for i, a in enumerate(arrays) for w in self._windows(i, a.shape[0])]
        paths: list[list[tuple[np.ndarray, np.ndarray, int]]] = [[] for _ in arrays]
        for b in range(0, len(windows), self.max_batch):
            group = windows[b : b + self.max_batch]
            pieces = [arrays[w.clip][w.start : w.start + self.window] for w in group]
            feats, lengths = self.features(pieces)
            with torch.inference_mode():
                logp, out_len = self.model.log_probs(feats, lengths)
            for w, lp, n in zip(group, logp, out_len, strict=True):
                lp = lp[: int(n)]
                kept = lp[w.keep_from : w.keep_to]
                first = w.start // self.frame_samples + w.keep_from
                paths[w.clip].append((kept.argmax(-1), kept.max(-1), first))
        return [self._result(p, a.shape[0], timestamps) for p, a in zip(paths, arrays, strict=True)]

    def _check(self, samples: np.ndarray) -> np.ndarray:
        a = np.asarray(samples, dtype=np.float32)
        if a.ndim != 1:
            raise MediaError(f"audio samples must be mono [N], got shape {a.shape}")
        if a.size and not np.isfinite(a).all():
            raise MediaError("audio samples contain NaN or infinite values")
        return a

    def _windows(self, clip: int, n: int) -> list[_Window]:
        if n < self.frame_samples:  # under one encoder frame (80 ms for 8x): nothing to recognize
            return []
        if n <= self.window:
            return [_Window(clip, 0, 0, None)]
        h = self.half_overlap_frames
        stride = self.window - 2 * h * self.frame_samples
        count = 1 + math.ceil(max(0, n - self.window) / stride)
        out = []
        for k in range(count):
            last = k == count - 1
            out.append(
                _Window(clip, k * stride, 0 if k == 0 else h, None if last else self.window // self.frame_samples - h)
            )
        return out

    def _result(self, parts: list[tuple[np.ndarray, np.ndarray, int]], n: int, timestamps: bool) -> Transcription:
        duration = n / SAMPLE_RATE
        if not parts:
            return Transcription(text="", duration=duration)
        best = np.concatenate([p[0] for p in parts])  # the joined frame-level best path
        score = np.concatenate([p[1] for p in parts])  # its per-frame log-prob (avg_logprob of a segment)
        ids, frames = collapse(best, self.blank_id)
        text = self.vocab.decode(ids)
        segments: list[Segment] = []
        if timestamps:
            base = parts[0][2]
            fs = self.frame_seconds
            for (b, _s, first), nxt in zip(parts, [*[p[2] for p in parts[1:]], None], strict=True):
                lo, hi = first - base, first - base + b.shape[0]
                seg_ids = [i for i, f in zip(ids, frames, strict=True) if lo <= f < hi]
                end = duration if nxt is None else min(duration, nxt * fs)
                seg_scores = score[lo:hi]
                segments.append(Segment(
                    start=round(first * fs, 3), end=round(end, 3), text=self.vocab.decode(seg_ids),
                    token_ids=seg_ids, avg_logprob=float(seg_scores.mean()) if seg_scores.size else None,
                ))  # fmt: skip
        return Transcription(text=text, language=self.language, duration=duration, segments=segments,
                             num_tokens=len(ids))  # fmt: skip
