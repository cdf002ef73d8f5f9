"""Engine configuration: one frozen dataclass built once by a factory.

Precedence for every field: explicit value (CLI flag / keyword) > `AUTOGLM_<FIELD>` environment variable > value from
the model files (e.g. the context length) > the built-in default below.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from autoglm.errors import InvalidRequest

ENV_PREFIX = "AUTOGLM_"


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of the batch-first engine (scheduler, KV cache, runner)."""

    max_model_len: int | None = None  # None: the model's context length
    max_num_seqs: int = 16  # requests in one batch
    max_num_batched_tokens: int = 2048  # token budget per step (prefill chunks + decode tokens)
    # While other requests decode or wait, one prompt's prefill chunk is at most this many tokens (vLLM's name): a
    # short request is admitted at once and decodes every step instead of waiting behind a long prompt's whole
    # budget-sized chunks (10 s a step on 2 cores). Alone, a prompt takes the whole budget. 0: off.
    long_prefill_token_threshold: int = 512
    block_size: int = 16  # tokens per KV cache block
    kv_cache_memory: int | None = None  # bytes for the KV cache; None: the default rule of engine/memory.py
    kv_cache_fraction: float = 0.25  # default rule: at most this share of the available RAM
    # default rule: a pool of this many tokens shared by all sequences (llama.cpp's n_ctx), unless the context
    # (max_model_len, when given) needs more
    kv_cache_tokens: int = 16384
    num_kv_blocks: int | None = None  # exact block count (tests, benchmarks); overrides the memory budget
    kv_cache_dtype: str = "auto"  # "auto" = the decoder's dtype
    max_waiting: int = 1024  # waiting-queue bound; beyond it add_request raises Overloaded (HTTP 429)
    # A hit reuses K/V computed from the same tokens and media (same results, tested); cached blocks sit in the free
    # list and are evicted oldest-first, so caching costs no memory; scoring bypasses it. On by default for the
    # server (`autoglm serve` passes it as a default: agents resend their history), off for LLM/bench, whose
    # repeated identical prompts would otherwise measure the cache instead of the model.
    enable_prefix_caching: bool = False
    encoder_cache_memory: int = 256 * 2**20  # bytes of encoder outputs kept by media content hash; 0 = off
    request_timeout: float | None = None  # seconds from arrival; past it a request ends with RequestTimeout
    # Bound for requests without max_tokens (EOS still stops them first); None or 0: the rest of the context.
    # The server passes its --default-max-tokens (2048); LLM keeps the unbounded default of a library call.
    default_max_tokens: int | None = None
    attention_backend: str = "auto"  # "auto" | "cuda_sdpa" | "torch" (layers/attention make_backend)
    cuda_graphs: bool = True  # decode steps as CUDA graphs when the decoder is on CUDA (engine/cuda_graphs.py)
    # Batch-invariant greedy output: a token's logits do not depend on what shares its step, on prefill chunking or
    # on the prefix cache (every row through the row-independent GEMV, every query through the decode attention).
    # Costs prefill speed (BENCHMARKS.md "Deterministic greedy (issue 11)"), so off unless asked for.
    deterministic: bool = False

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_waiting", "kv_cache_tokens"):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}", param=name)
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidRequest(f"EngineConfig.max_model_len must be >= 2, got {self.max_model_len}")
        if self.long_prefill_token_threshold < 0:
            raise InvalidRequest("EngineConfig.long_prefill_token_threshold must be >= 0 (0: off), got "
                                 f"{self.long_prefill_token_threshold}", param="long_prefill_token_threshold")
        if self.encoder_cache_memory < 0:
            raise InvalidRequest(f"EngineConfig.encoder_cache_memory must be >= 0, got {self.encoder_cache_memory}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise InvalidRequest(f"EngineConfig.request_timeout must be > 0 seconds, got {self.request_timeout}",
                                 param="request_timeout")
        if self.default_max_tokens is not None and self.default_max_tokens < 0:
            raise InvalidRequest(f"EngineConfig.default_max_tokens must be >= 0, got {self.default_max_tokens}",
                                 param="default_max_tokens")
        if not 0 < self.kv_cache_fraction <= 1:
            raise InvalidRequest(f"EngineConfig.kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if self.attention_backend != "auto":
            from autoglm.layers.attention import BACKEND_KINDS

            if self.attention_backend not in BACKEND_KINDS:
                raise InvalidRequest(f"EngineConfig.attention_backend must be one of {', '.join(BACKEND_KINDS)}, got "
                                     f"{self.attention_backend!r}", param="attention_backend")

    @classmethod
    def from_sources(
        cls,
        explicit: Mapping[str, Any] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        model_values: Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
    ) -> EngineConfig:
        """Merge flag values (None = not given) > AUTOGLM_* env > model-file values > `defaults` (a caller's own,
        e.g. the server's) > the built-in defaults.

        Unknown explicit keys raise InvalidRequest naming them (typos in `LLM(**engine_kwargs)` must not pass silently).
        """
        explicit = {k: v for k, v in (explicit or {}).items() if v is not None}
        env = os.environ if env is None else env
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(explicit) - set(known))
        if unknown:
            raise InvalidRequest(f"unknown engine option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for name in known:
            if name in explicit:
                values[name] = explicit[name]
            elif (raw := env.get(ENV_PREFIX + name.upper())) not in (None, ""):
                values[name] = _parse_env(name, raw, hints[name])
            elif model_values and model_values.get(name) is not None:
                values[name] = model_values[name]
            elif defaults and defaults.get(name) is not None:
                values[name] = defaults[name]
        return cls(**values)


def _parse_env(name: str, raw: str, hint: Any) -> Any:
    # Field types are `T` or `T | None`; take the non-None member.
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return hint(raw)
    except ValueError:
        raise InvalidRequest(
            f"environment variable {ENV_PREFIX}{name.upper()}={raw!r} is not a valid {hint.__name__}"
        ) from None
