"""Per-request sampling settings. `None` means "not set by the caller": the model's generation_config.json value
applies, then the built-in default (see `resolve`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from autoglm.errors import InvalidRequest

MAX_INT32 = 2**31  # ids, counts and top-k are int32 in the sampler and kernels
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024
_FLOATS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
_INTS = ("max_tokens", "top_k", "seed", "logprobs")

_BUILTIN: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
}


@dataclass
class SamplingParams:
    max_tokens: int | None = None  # None: up to the context window
    temperature: float | None = None  # 0 -> greedy
    top_p: float | None = None
    top_k: int | None = None  # 0 or -1: off
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None  # per-request generator: same seed -> same tokens
    stop: list[str] = field(default_factory=list)  # cut before the first occurrence; never emitted
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the model's EOS ids
    ignore_eos: bool = False  # keep generating through EOS/stop ids (benchmarks)
    logprobs: int | None = None  # None: off; k >= 0: chosen token's logprob plus top-k alternatives
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling (OpenAI: -100..100)
    skip_special_tokens: bool = True
    # a CompiledGrammar (engine/grammar.py) the output must follow: tool_choice, response_format, guided_*
    grammar: Any = None

    def resolve(self, defaults: dict[str, Any] | None = None) -> SamplingParams:
        """Fill unset fields from `defaults` (generation_config.json) then built-ins, and validate."""
        out = replace(self)
        for name, builtin in _BUILTIN.items():
            if getattr(out, name) is None:
                value = (defaults or {}).get(name)
                setattr(out, name, builtin if value is None else value)
        out.validate()
        return out

    def validate(self) -> None:
        """Every field in the range the sampler and kernels take (400 naming the field otherwise): floats finite,
        integers bounded, so one request can never fail a batch it shares with others."""
        self._check_types()
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens")
        if self.temperature is not None and self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}", param="temperature")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p}", param="min_p")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise InvalidRequest(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}", param="repetition_penalty"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not -2 <= value <= 2:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {value}", param=name)
        for tok, bias in (self.logit_bias or {}).items():
            if tok < 0 or not -100 <= bias <= 100:
                raise InvalidRequest(
                    f"logit_bias maps token ids >= 0 to values in [-100, 100], got {tok}: {bias}", param="logit_bias"
                )
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequest(f"top_logprobs must be in [0, 20], got {self.logprobs}", param="top_logprobs")
        if self.top_k is not None and self.top_k < -1:
            raise InvalidRequest(f"top_k must be -1 (off), 0 (off) or a positive count, got {self.top_k}",
                                 param="top_k")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise InvalidRequest(f"seed must fit in 64 bits, got {self.seed}", param="seed")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise InvalidRequest(
                f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters", param="stop"
            )
        if any(not 0 <= t < MAX_INT32 for t in self.stop_token_ids):
            raise InvalidRequest("stop_token_ids must be token ids (0 <= id < 2**31)", param="stop_token_ids")

    def _check_types(self) -> None:
        for name in _FLOATS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidRequest(f"{name} must be a finite number, got {value!r}", param=name)
        for name in _INTS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequest(f"{name} must be an integer, got {value!r}", param=name)
            if name != "seed" and not -MAX_INT32 <= value < MAX_INT32:
                raise InvalidRequest(f"{name} must be below 2**31, got {value}", param=name)
        for tok, bias in (self.logit_bias or {}).items():
            if not isinstance(bias, int | float) or not math.isfinite(bias):
                raise InvalidRequest(f"logit_bias values must be finite numbers, got {tok}: {bias!r}",
                                     param="logit_bias")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SamplingParams:
        """Build from keyword arguments, naming any unknown one (the Python API's `**sampling`)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidRequest(
                f"unknown sampling parameter(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        if isinstance(kwargs.get("stop"), str):
            kwargs["stop"] = [kwargs["stop"]]
        return cls(**kwargs)
