"""Model configs parsed from HF `config.json` (transformers 4.5x and 5.x spellings) into plain dataclasses: GLM's
`TextConfig` / `VisionConfig`, and the helpers every architecture's args use (`hf_text_section`, `rope_settings`,
`known_fields`, `gguf_need`, `checkpoint_facts`).

`from_dict` keeps the keys a field knows, `__post_init__` derives the rest (head_dim, rotary_dim, M-RoPE), the way
mlx-lm's `ModelArgs` do. Neither class imports transformers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoglm.errors import ConfigError

# Token-id keys GLM-4.1V keeps at the top level (5.x) or inside text_config (4.5x); we read either.
_MEDIA_TOKEN_KEYS = (
    "image_token_id",
    "video_token_id",
    "image_start_token_id",
    "image_end_token_id",
    "video_start_token_id",
    "video_end_token_id",
)
_DTYPES = ("float32", "bfloat16", "float16")


def read_config_json(path: str | Path) -> dict[str, Any]:
    """Read `config.json` from a model directory (or the file itself); ConfigError names the file on failure."""
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not f.is_file():
        raise ConfigError(f"{f}: config.json not found (is {p} a Hugging Face model directory?)")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{f}: expected a JSON object, got {type(data).__name__}")
    return data


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {k: v for k, v in d.items() if k in names}


def known_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """The keys of `d` that are init fields of dataclass `cls` (None values dropped: the field default applies)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    out = {k: v for k, v in d.items() if k in names and v is not None}
    if "torch_dtype" in names:
        out["torch_dtype"] = _dtype_name(d.get("torch_dtype", d.get("dtype")))
    return out


def hf_text_section(config: dict[str, Any]) -> dict[str, Any]:
    """The text model's keys of a config.json dict: `text_config` (if any) over the top-level keys."""
    text = config.get("text_config")
    if text is not None and not isinstance(text, dict):
        raise ConfigError(f"config key 'text_config' must be an object, got {type(text).__name__}")
    out = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
    out.update(text or {})
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if key not in out:
            raise ConfigError(f"config.json has no {key!r}", param=key)
    return out


def rope_settings(d: dict[str, Any]) -> dict[str, Any]:
    """{rope_theta, rope_scaling_factor} from 5.x `rope_parameters` or 4.5x `rope_theta` + `rope_scaling`;
    ConfigError for scaling types we do not implement (yarn, dynamic, llama3, ...)."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"config key 'rope_parameters'/'rope_scaling' must be an object, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ConfigError(f"unsupported rope type {kind!r} (supported: default, linear)", param="rope_type")
    out: dict[str, Any] = {"rope_scaling_factor": float(rope.get("factor", 1.0)) if kind == "linear" else 1.0}
    theta = rope.get("rope_theta", d.get("rope_theta"))
    if theta is not None:
        out["rope_theta"] = float(theta)
    return out


def checkpoint_facts(config: dict[str, Any]) -> tuple[str | None, list[int], int]:
    """(torch_dtype name or None, eos token ids, max_position_embeddings) of any architecture's config.json."""
    d = hf_text_section(config)
    dtype = _dtype_name(d.get("torch_dtype") or d.get("dtype") or config.get("torch_dtype") or config.get("dtype"))
    e = d.get("eos_token_id", config.get("eos_token_id"))
    eos = [] if e is None else [int(e)] if isinstance(e, int) else [int(x) for x in e]
    return dtype, eos, int(d.get("max_position_embeddings") or 4096)


def gguf_need(f: Any, key: str) -> Any:
    """A required GGUF metadata value; ConfigError names the file and the key when it is absent."""
    v = f.get(key)
    if v is None:
        raise ConfigError(f"{f.path}: GGUF metadata has no {key!r}", param=key)
    return v


def _dtype_name(value: Any) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    return name if name in _DTYPES else None


@dataclass
class TextConfig:
    """GLM-4 / GLM-4.1V text decoder hyper-parameters (autoglm.models.glm4; other architectures have their own).

    Derived in `__post_init__`: `head_dim` (if absent), `rotary_dim`, `uses_mrope`, `num_key_value_heads` (if absent).
    """

    model_type: str = "glm4"
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling_factor: float = 1.0  # "linear" RoPE scaling: positions are divided by it
    partial_rotary_factor: float | None = None
    mrope_section: list[int] | None = None
    torch_dtype: str | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    image_token_id: int | None = None
    video_token_id: int | None = None
    image_start_token_id: int | None = None
    image_end_token_id: int | None = None
    video_start_token_id: int | None = None
    video_end_token_id: int | None = None
    # derived
    rotary_dim: int = field(init=False, default=0)
    uses_mrope: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads <= 0 or self.hidden_size <= 0:
            raise ConfigError("num_attention_heads and hidden_size must be positive", param="num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})",
                param="num_key_value_heads",
            )
        rope_head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.model_type == "glm4v_text":
            # transformers' Glm4vTextAttention sizes heads as hidden // heads whatever head_dim says;
            # only its rotary embedding reads head_dim.
            self.head_dim = self.hidden_size // self.num_attention_heads
        elif self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.partial_rotary_factor is None:
            # transformers' defaults: Glm4Config sets 0.5, Glm4vTextConfig none (= 1.0)
            self.partial_rotary_factor = 0.5 if self.model_type == "glm4" else 1.0
        self.rotary_dim = int(rope_head_dim * self.partial_rotary_factor)
        if self.mrope_section is None and self.model_type == "glm4v_text":
            self.mrope_section = [8, 12, 12]  # transformers' default for GLM-4.1V
        self.uses_mrope = self.mrope_section is not None
        if self.uses_mrope:
            self.mrope_section = [int(x) for x in self.mrope_section or []]
            if 2 * sum(self.mrope_section) != self.rotary_dim:
                raise ConfigError(
                    f"mrope_section {self.mrope_section} sums to {sum(self.mrope_section)}, expected rotary_dim/2 = "
                    f"{self.rotary_dim // 2} (head_dim {rope_head_dim} x partial_rotary_factor "
                    f"{self.partial_rotary_factor})",
                    param="mrope_section",
                )
        self.torch_dtype = _dtype_name(self.torch_dtype)

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else [int(x) for x in e]

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TextConfig:
        """A full HF config.json dict (nested `text_config` or flat) -> TextConfig."""
        top = dict(config)
        text = top.get("text_config")
        if text is not None and not isinstance(text, dict):
            raise ConfigError(f"config key 'text_config' must be an object, got {type(text).__name__}")
        d: dict[str, Any] = dict(text) if text else dict(top)
        if text:
            # transformers reads the media token ids from the top level (Glm4vConfig); text_config copies, where
            # present, are ignored by it, so the top level wins.
            for k in _MEDIA_TOKEN_KEYS:
                if top.get(k) is not None:
                    d[k] = top[k]
            for k in ("eos_token_id", "pad_token_id", "bos_token_id"):
                if d.get(k) is None and top.get(k) is not None:
                    d[k] = top[k]
            # Glm4vConfig ties when either level says so
            d["tie_word_embeddings"] = bool(top.get("tie_word_embeddings") or d.get("tie_word_embeddings"))
            if d.get("torch_dtype") is None and d.get("dtype") is None:
                d["dtype"] = top.get("dtype", top.get("torch_dtype"))
            if "model_type" not in d and top.get("model_type") == "glm4v":
                d["model_type"] = "glm4v_text"
        elif top.get("model_type") == "glm4v":
            d["model_type"] = "glm4v_text"  # 4.5x flat GLM-4.1V config
        if d.get("torch_dtype") is None:
            d["torch_dtype"] = d.get("dtype")
        # RoPE: 5.x `rope_parameters` or 4.5x `rope_scaling` (+ top-level rope_theta / partial_rotary_factor).
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"config key 'rope_parameters'/'rope_scaling' must be an object, got {rope!r}")
        for key in ("rope_theta", "partial_rotary_factor", "mrope_section"):
            if rope.get(key) is not None:
                d[key] = rope[key]
        d["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
        if d["rope_type"] not in ("default", "mrope", "linear"):
            raise ConfigError(
                f"unsupported rope type {d['rope_type']!r} (supported: default, mrope, linear)", param="rope_type"
            )
        if d["rope_type"] == "linear":
            d["rope_scaling_factor"] = float(rope.get("factor", 1.0))
        if d["rope_type"] == "mrope" and d.get("mrope_section") is None:
            raise ConfigError("rope type 'mrope' without mrope_section", param="mrope_section")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ConfigError(f"config.json has no {key!r}", param=key)
        try:
            return cls(**_known(cls, d))
        except TypeError as e:
            raise ConfigError(f"invalid text config: {e}") from e


@dataclass
class VisionConfig:
    """GLM-4.1V vision tower hyper-parameters (`vision_config`). Derived: `head_dim`."""

    depth: int = 24
    hidden_size: int = 1536
    hidden_act: str = "silu"
    attention_bias: bool = False
    num_heads: int = 12
    in_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    rms_norm_eps: float = 1e-5
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 4096
    intermediate_size: int = 13696
    model_type: str = "glm4v_vision"
    head_dim: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.num_heads <= 0 or self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}",
                param="vision_config.num_heads",
            )
        self.head_dim = self.hidden_size // self.num_heads
        if isinstance(self.image_size, (list, tuple)):
            self.image_size = int(self.image_size[0])
        if isinstance(self.patch_size, (list, tuple)):
            self.patch_size = int(self.patch_size[0])
        if isinstance(self.temporal_patch_size, (list, tuple)):
            self.temporal_patch_size = int(self.temporal_patch_size[0])

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> VisionConfig | None:
        """A full HF config.json dict -> VisionConfig, or None when it has no `vision_config`."""
        v = config.get("vision_config")
        if v is None:
            return None
        if not isinstance(v, dict):
            raise ConfigError(f"config key 'vision_config' must be an object, got {type(v).__name__}")
        d = dict(v)
        # transformers' attribute_map aliases
        if "num_heads" not in d and "num_attention_heads" in d:
            d["num_heads"] = d["num_attention_heads"]
        if "depth" not in d and "num_hidden_layers" in d:
            d["depth"] = d["num_hidden_layers"]
        try:
            return cls(**_known(cls, d))
        except TypeError as e:
            raise ConfigError(f"invalid vision_config: {e}") from e
