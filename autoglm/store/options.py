"""Ollama option names -> autoglm sampling settings (Modelfile PARAMETERs and `/api` request `options` alike)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from autoglm.errors import InvalidRequest
from autoglm.store.modelfile import parse_parameter

log = logging.getLogger("autoglm.store")

# Ollama options with no counterpart here (runner placement, llama.cpp batch sizes, a repeat window): accepted, unused
IGNORED_OPTIONS = frozenset({"num_keep", "typical_p", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap",
                             "numa", "repeat_last_n"})


def merge_options(defaults: Mapping[str, Any], options: Mapping[str, Any] | None) -> dict[str, Any]:
    """`options` typed as Ollama types them, over `defaults`; unknown names are logged and ignored (as Ollama
    does), a value of the wrong type raises InvalidRequest naming the option."""
    merged = dict(defaults)
    if options is not None and not isinstance(options, Mapping):
        raise InvalidRequest(f"options must be an object, got {type(options).__name__}", param="options")
    for key, value in (options or {}).items():
        k = key.lower()
        if k == "stop":
            if value is not None and not isinstance(value, str) and not (
                    isinstance(value, list) and all(isinstance(s, str) for s in value)):
                raise InvalidRequest("option stop must be a string or a list of strings", param="stop")
            merged["stop"] = [value] if isinstance(value, str) else list(value or [])
            continue
        try:
            typed = parse_parameter(k, value)
        except InvalidRequest as e:
            if "unknown parameter" in e.message:
                log.info("ignoring unknown option %r", key)
                continue
            raise
        if typed is not None:
            merged[k] = typed
    return merged


def sampling_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """Merged options -> `SamplingParams` keyword arguments (unset ones left out; num_predict <= 0 means no cap)."""
    predict = options.get("num_predict")
    out: dict[str, Any] = {
        "max_tokens": predict if isinstance(predict, int) and predict > 0 else None,
        "temperature": options.get("temperature"), "top_p": options.get("top_p"), "top_k": options.get("top_k"),
        "min_p": options.get("min_p"), "presence_penalty": options.get("presence_penalty"),
        "frequency_penalty": options.get("frequency_penalty"), "repetition_penalty": options.get("repeat_penalty"),
        "seed": options.get("seed"),
    }
    out = {k: v for k, v in out.items() if v is not None}
    if options.get("stop"):
        out["stop"] = list(options["stop"])
    return out
