"""ServerConfig: every `autoglm serve` flag, each also readable from an `AUTOGLM_<FLAG>` environment variable.

Precedence: command-line flag > `AUTOGLM_*` environment variable > built-in default (model files supply sampling
defaults later, per request). One table (`_OPTIONS`) drives argparse, the environment and the README.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from autoglm.errors import ConfigError

# Server-wide defaults for how reasoning reaches the client (the table in reasoning_format.py). Requests may
# override per call.
REASONING_FORMATS = ("merged", "separate", "inline", "hidden")
# The article's model name. Without --served-model-name the server also answers to it (README: Model names), so the
# article's and phone_agent's client code works unchanged; /v1/models and each response name the model that answers.
ARTICLE_MODEL_NAME = "autoglm-phone-9b"
# A chat request without max_tokens stops at EOS or after this many tokens (and never past the context).
# llama-server (n_predict -1) and Ollama (num_predict -1) and vLLM (the rest of the context) do not bound it; a base
# model or a looping one would then run to the context length (32k for the built-ins, minutes on a phone CPU).
DEFAULT_MAX_TOKENS = 2048


@dataclass(frozen=True)
class ServerConfig:
    model: str | None = None  # None: the built-in default model
    mmproj: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: tuple[str, ...] = ()  # first = the name /v1/models reports; the rest are aliases
    strict_model_name: bool = False  # True: only served names are accepted (vLLM); else ARTICLE_MODEL_NAME too
    default_max_tokens: int = DEFAULT_MAX_TOKENS  # for requests that omit max_tokens; 0: the rest of the context
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()  # browser origins beyond the local ones (server/browser.py); "*": any
    max_model_len: int | None = None
    reasoning_format: str = "merged"
    allowed_local_media_path: str | None = None
    allow_remote_media: bool = False
    limit_mm_per_prompt: int = 8
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 24_000_000
    # 8 phone screenshots (1080x2400 PNG, ~4 MB each) base64-encoded plus text: 48 MiB
    max_request_body_bytes: int = 48 * 1024 * 1024
    remote_media_timeout: float = 5.0
    dtype: str = "auto"
    device: str = "cpu"
    # `autoglm --cpu-isa` (the CLI frame's flag, handed over by `serve`): the CPU kernel variant of a GGUF decoder;
    # None: $AUTOGLM_CPU_ISA at kernel selection, else the best this CPU runs
    cpu_isa: str | None = None
    no_vision: bool = False
    quantization: str | None = None
    chat_template: str | None = None
    max_num_seqs: int | None = None
    kv_cache_memory: int | None = None
    log_level: str = "info"
    # concurrency and backpressure (engine options; None: the engine's default)
    max_num_batched_tokens: int | None = None
    long_prefill_token_threshold: int | None = None
    max_waiting: int | None = None
    request_timeout: float | None = None
    no_prefix_caching: bool = False
    deterministic: bool = False
    drain_grace: float = 10.0
    # speech (issue 12): the module behind /v1/audio/* and chat input_audio parts
    speech_model: str | None = None  # None: the built-in Whisper base (CTranslate2)
    no_speech: bool = False
    max_audio_seconds: float = 15.0  # chat input_audio clips (the article's limit)
    max_audio_file_seconds: float = 600.0  # /v1/audio/* files (windowed by the recognizer)
    max_audio_bytes: int = 25 * 1024 * 1024  # OpenAI's upload limit
    max_speech_queue: int = 32
    sse_keepalive: float = 5.0  # seconds between `: keep-alive` SSE comments while a stream waits; 0 = off

    def __post_init__(self) -> None:
        if self.reasoning_format not in REASONING_FORMATS:
            raise ConfigError(
                f"--reasoning-format must be one of {', '.join(REASONING_FORMATS)}, got {self.reasoning_format!r}"
            )
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        if self.limit_mm_per_prompt < 0:
            raise ConfigError(f"--limit-mm-per-prompt must be >= 0, got {self.limit_mm_per_prompt}")
        if not 0 <= self.sse_keepalive < float("inf"):
            raise ConfigError(f"--sse-keepalive must be a finite number of seconds >= 0, got {self.sse_keepalive}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"--max-model-len must be >= 2, got {self.max_model_len}")
        if self.default_max_tokens < 0:
            raise ConfigError(f"--default-max-tokens must be >= 0 (0: no bound), got {self.default_max_tokens}")
        if self.max_request_body_bytes < 1024:
            raise ConfigError(f"--max-request-body-bytes must be >= 1024, got {self.max_request_body_bytes}")
        if self.drain_grace < 0:
            raise ConfigError(f"--drain-grace must be >= 0, got {self.drain_grace}")
        if self.cpu_isa is not None:  # an unknown one, or one this CPU lacks: CpuIsaError before any model is read
            from autoglm.kernels.cpu import variants

            variants.resolve(self.cpu_isa)
        if self.device != "cpu":  # fail before any model is read (loader/device.py names the torch build)
            from autoglm.loader.device import check_device

            check_device(self.device)
        for flag, value in (("--max-audio-seconds", self.max_audio_seconds),
                            ("--max-audio-file-seconds", self.max_audio_file_seconds),
                            ("--max-audio-bytes", self.max_audio_bytes), ("--max-speech-queue", self.max_speech_queue)):
            if not value > 0:
                raise ConfigError(f"{flag} must be > 0, got {value}")

    @classmethod
    def from_sources(
        cls, cli: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> ServerConfig:
        """Merge flags (values of None mean "not given") over `AUTOGLM_*` variables over defaults."""
        cli = cli or {}
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for opt in _OPTIONS:
            given = cli.get(opt.cli_key)
            if given is not None and given != ():
                values[opt.dest] = _coerce(opt, given, source=opt.flags[0])
            elif opt.env in environ and environ[opt.env] != "":
                values[opt.dest] = _coerce(opt, environ[opt.env], source=opt.env)
        if cli.get("cpu_isa") is not None:  # the frame's flag; $AUTOGLM_CPU_ISA stays the kernel selection's default
            values["cpu_isa"] = str(cli["cpu_isa"])
        return cls(**values)


@dataclass(frozen=True)
class _Option:
    flags: tuple[str, ...]
    dest: str
    kind: type  # str, int, float, bool, list
    help: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    arg_dest: str | None = None  # argparse dest when `dest` would clash with the CLI frame's own option

    @property
    def cli_key(self) -> str:
        return self.arg_dest or self.dest

    @property
    def env(self) -> str:
        return "AUTOGLM_" + self.dest.upper()


_OPTIONS: tuple[_Option, ...] = (
    _Option(("-m", "--model"), "model", str, "model directory or .gguf file (default: the built-in model)"),
    _Option(("--mmproj",), "mmproj", str, "GGUF vision projector for a GGUF model (llama.cpp's --mmproj)"),
    _Option(("--host",), "host", str, "bind address (default 127.0.0.1; use 0.0.0.0 to serve the network)"),
    _Option(("--port",), "port", int, "TCP port (default 8000)"),
    _Option(
        ("--served-model-name",), "served_model_name", list, "name clients send as `model`; repeat for aliases",
        metavar="NAME",
    ),
    _Option(("--strict-model-name",), "strict_model_name", bool,
            f"accept only the served names (vLLM's 404 otherwise); default: also '{ARTICLE_MODEL_NAME}' when no "
            "--served-model-name is given"),
    _Option(("--default-max-tokens",), "default_max_tokens", int,
            f"tokens a request without max_tokens may generate (default {DEFAULT_MAX_TOKENS}; 0: up to the "
            "context)"),
    _Option(("--api-key",), "api_key", str, "require `Authorization: Bearer KEY` on /v1 and /api (default: off)"),
    _Option(("--allowed-origins",), "allowed_origins", list,
            "browser origins (CORS) allowed beyond this machine's own pages; repeat or comma-separate, * for any "
            "(default: localhost origins only, as Ollama)", metavar="ORIGIN"),
    _Option(("--max-model-len",), "max_model_len", int,
            "context window in tokens (default: the model's, cut to the default KV pool; README)"),
    _Option(
        ("--reasoning-format",),
        "reasoning_format",
        str,
        "default reasoning placement (README: Thinking and reasoning)",
        choices=REASONING_FORMATS,
    ),
    _Option(
        ("--allowed-local-media-path",), "allowed_local_media_path", str,
        "directory under which file:// and plain-path images may be read (default: none)",
    ),
    _Option(("--allow-remote-media",), "allow_remote_media", bool, "allow http(s) image URLs (default: refused)"),
    _Option(("--limit-mm-per-prompt",), "limit_mm_per_prompt", int, "most images in one prompt (default 8)"),
    _Option(("--max-image-bytes",), "max_image_bytes", int, "largest encoded image accepted (default 20 MiB)"),
    _Option(("--max-image-pixels",), "max_image_pixels", int, "largest width*height accepted (default 24M)"),
    _Option(("--max-request-body-bytes",), "max_request_body_bytes", int,
            "largest request body accepted, else 413 (default 48 MiB: 8 base64 phone screenshots)"),
    _Option(("--remote-media-timeout",), "remote_media_timeout", float, "seconds for fetching a remote image"),
    _Option(("--dtype",), "dtype", str, "weight dtype: auto, float32, bfloat16, float16"),
    _Option(("--device",), "device", str, "device for the model: cpu, cuda, cuda:1, ..."),
    _Option(("--no-vision",), "no_vision", bool, "do not load the vision encoder (text-only)"),
    _Option(("--chat-template",), "chat_template", str, "Jinja template file or text replacing the model's own"),
    _Option(("--quantization",), "quantization", str, "int8 or int4 weight-only decoder (HF checkpoints)"),
    _Option(("--max-num-seqs",), "max_num_seqs", int, "most requests decoded together"),
    _Option(("--kv-cache-memory",), "kv_cache_memory", int, "bytes for the KV cache (default: engine's choice)"),
    _Option(("--max-num-batched-tokens",), "max_num_batched_tokens", int,
            "token budget of one engine step: prefill chunks + decodes (default 2048)"),
    _Option(("--long-prefill-token-threshold",), "long_prefill_token_threshold", int,
            "while others decode or wait, one prompt's prefill chunk is at most this many tokens (default 512; "
            "0: a prompt may take the whole step)"),
    _Option(("--max-waiting",), "max_waiting", int, "queued requests beyond which new ones get 429 (default 1024)"),
    _Option(("--request-timeout",), "request_timeout", float,
            "seconds after which a request is ended with a timeout error (default: none)"),
    _Option(("--no-prefix-caching",), "no_prefix_caching", bool, "do not share KV blocks of repeated prompt prefixes"),
    _Option(("--deterministic",), "deterministic", bool,
            "batch-invariant greedy output (same tokens cached or not, batched or alone; slower prefill)"),
    _Option(("--drain-grace",), "drain_grace", float,
            "on SIGTERM: seconds running requests get to finish before they end with an error (default 10)"),
    # speech module (issue 12)
    _Option(("--speech-model",), "speech_model", str,
            "speech module: HF dir, .onnx file or CTranslate2 dir, by content (default: built-in Whisper base)"),
    _Option(("--no-speech",), "no_speech", bool, "load no speech module (input_audio and /v1/audio/* get 400)"),
    _Option(("--max-audio-seconds",), "max_audio_seconds", float, "longest chat input_audio clip (default 15)"),
    _Option(("--max-audio-file-seconds",), "max_audio_file_seconds", float,
            "longest /v1/audio/* file, transcribed in windows (default 600)"),
    _Option(("--max-audio-bytes",), "max_audio_bytes", int, "largest audio file accepted, else 413 (default 25 MiB)"),
    _Option(("--max-speech-queue",), "max_speech_queue", int,
            "transcriptions queued beyond which new ones get 429 (default 32)"),
    _Option(("--sse-keepalive",), "sse_keepalive", float,
            "seconds between `: keep-alive` comments while a stream waits (prefill, queue); 0 = off (default 5)"),
    # `autoglm --log-level` (the CLI frame's) is a different option with a different default: keep them apart.
    _Option(("--log-level",), "log_level", str, "debug, info, warning, error (default info)",
            arg_dest="serve_log_level"),
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(opt: _Option, value: Any, *, source: str) -> Any:
    try:
        if opt.kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")
        if opt.dest == "limit_mm_per_prompt" and str(value).strip().startswith("{"):
            # vLLM's form: '{"image": 2}' (only images are limited here)
            return int(json.loads(str(value)).get("image", 0))
        if opt.kind is list:
            items = value if isinstance(value, (list, tuple)) else [value]
            return tuple(s.strip() for item in items for s in str(item).split(",") if s.strip())
        result = opt.kind(value)
        if opt.choices and result not in opt.choices:
            raise ValueError(f"expected one of {', '.join(opt.choices)}")
        return result
    except (ValueError, AttributeError) as exc:
        raise ConfigError(f"{source}={value!r} is invalid ({opt.kind.__name__} expected): {exc}") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every server flag; defaults are None so `from_sources` can tell "not given" from "given"."""
    for opt in _OPTIONS:
        help_text = f"{opt.help} [env {opt.env}]"
        if opt.kind is bool:
            parser.add_argument(*opt.flags, dest=opt.cli_key, action="store_const", const=True, default=None,
                                help=help_text)
        elif opt.kind is list:
            parser.add_argument(*opt.flags, dest=opt.cli_key, action="append", default=None, metavar=opt.metavar,
                                help=help_text)
        else:
            # Parsed as text; `from_sources` converts it, so bad values are reported the same way as env values.
            parser.add_argument(*opt.flags, dest=opt.cli_key, default=None, choices=opt.choices,
                                metavar=opt.metavar or opt.dest.upper(), help=help_text)


def option_table() -> list[tuple[str, str, str]]:
    """(flags, env var, help) rows, for documentation."""
    return [(", ".join(o.flags), o.env, o.help) for o in _OPTIONS]
