"""Gemma 3 text decoder (Gemma3ForCausalLM), packed-batch, HF attribute names.

Gemma specifics: RMSNorm scales by (1 + w); q/k RMSNorm per head; sandwich norms around attention and MLP;
every `sliding_window_pattern`-th layer is global (rope base `rope_theta`), the others are sliding-window layers with
their own rope base (`rope_local_base_freq`); attention scale `query_pre_attn_scalar ** -0.5`; embeddings scaled by
sqrt(hidden); GELU-tanh gated MLP; lm_head tied to the embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoglm.errors import ConfigError
from autoglm.layers.attention import Attention, AttentionContext
from autoglm.layers.linear import Linear
from autoglm.layers.norm import GemmaRMSNorm, add_norm
from autoglm.layers.rotary import RopeTables, apply_rope, rope_tables
from autoglm.models.config import gguf_need
from autoglm.models.positions import MediaSpan, PromptPositions, rope_positions

if TYPE_CHECKING:
    from autoglm.gguf.reader import GGUFFile

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass
class Gemma3Config:
    vocab_size: int = 262_144
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_hidden_layers: int = 18
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32_768
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_base_freq: float = 10_000.0  # sliding layers
    rope_scaling_factor: float = 1.0  # "linear" scaling of global layers (larger Gemma 3 models)
    query_pre_attn_scalar: float = 256.0
    sliding_window: int | None = 512
    sliding_window_pattern: int = 6
    layer_types: list[str] = field(default_factory=list)
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    hidden_activation: str = "gelu_pytorch_tanh"
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 0

    def __post_init__(self) -> None:
        if not self.layer_types:
            # HF's rule: layer i is global when (i + 1) is a multiple of the pattern
            self.layer_types = [
                FULL if (i + 1) % self.sliding_window_pattern == 0 else SLIDING for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"gemma3 config: layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        if self.attn_logit_softcapping is not None:
            raise ConfigError("gemma3 config: attn_logit_softcapping is not supported (Gemma 3 does not use it)")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"gemma3 config: unsupported hidden_activation {self.hidden_activation!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Gemma3Config:
        """From an HF config.json dict (transformers 4.5x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        if isinstance(d.get("text_config"), dict):  # Gemma3ForConditionalGeneration wraps the text config
            d = {**d["text_config"]}
        known = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in known and v is not None}
        kw.pop("rope_scaling_factor", None)
        rp = d.get("rope_parameters")
        if isinstance(rp, dict) and FULL in rp:
            kw["rope_theta"] = float(rp[FULL].get("rope_theta", kw.get("rope_theta", cls.rope_theta)))
            kw["rope_local_base_freq"] = float(rp.get(SLIDING, {}).get("rope_theta", cls.rope_local_base_freq))
            scaling: dict[str, Any] | None = rp[FULL]
        else:
            scaling = d.get("rope_scaling")
        if isinstance(scaling, dict):
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind == "linear":
                kw["rope_scaling_factor"] = float(scaling["factor"])
            elif kind != "default":
                raise ConfigError(f"gemma3 config: unsupported rope scaling type {kind!r}")
        return cls(**kw)

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> Gemma3Config:
        """GGUF `gemma3.*` metadata (llama.cpp's keys and defaults) -> config."""
        a = "gemma3"
        n_layers = int(gguf_need(f, f"{a}.block_count"))
        hidden = int(gguf_need(f, f"{a}.embedding_length"))
        heads = int(gguf_need(f, f"{a}.attention.head_count"))
        head_dim = int(f.get(f"{a}.attention.key_length", hidden // heads))
        pattern = f.get(f"{a}.attention.sliding_window_pattern")
        if pattern is None or isinstance(pattern, int | float):
            period = int(pattern or 6)  # llama.cpp's built-in Gemma 3 pattern: 5 local layers, then 1 global
            layer_types = [FULL if (i + 1) % period == 0 else SLIDING for i in range(n_layers)]
        else:  # per-layer flags, True = sliding
            layer_types = [SLIDING if bool(x) else FULL for x in pattern]
        scale = f.get(f"{a}.attention.scale")
        # llama.cpp: 1/sqrt(head_dim), except Gemma 3 27B (62 layers) which uses 1/sqrt(hidden/heads)
        scalar = 1.0 / float(scale) ** 2 if scale else float(hidden // heads if n_layers == 62 else head_dim)
        scaling = f.get(f"{a}.rope.scaling.type")
        if scaling not in (None, "none", "linear"):
            raise ConfigError(f"{f.path}: unsupported {a}.rope.scaling.type {scaling!r}")
        factor = f.get(f"{a}.rope.scaling.factor") if scaling == "linear" else None
        embd = f.tensors.get("token_embd.weight")
        if embd is None:
            raise ConfigError(f"{f.path}: GGUF has no token_embd.weight")
        softcap = f.get(f"{a}.final_logit_softcapping")
        return cls(
            vocab_size=embd.shape[0],
            hidden_size=hidden,
            intermediate_size=int(gguf_need(f, f"{a}.feed_forward_length")),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(f.get(f"{a}.attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(f.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=int(f.get(f"{a}.context_length", 32768)),
            rope_theta=float(f.get(f"{a}.rope.freq_base", 1_000_000.0)),
            rope_local_base_freq=float(f.get(f"{a}.rope.freq_base_swa", 10_000.0)),
            rope_scaling_factor=float(factor) if factor else 1.0,
            query_pre_attn_scalar=scalar,
            sliding_window=int(f.get(f"{a}.attention.sliding_window", 4096)),
            layer_types=layer_types,
            final_logit_softcapping=None if softcap is None else float(softcap),
            tie_word_embeddings="output.weight" not in f.tensors,
            bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=f.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=f.get("tokenizer.ggml.padding_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """transformers 5.x `Gemma3TextConfig` dict (model_type gemma3_text)."""
        full: dict[str, Any] = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        if self.rope_scaling_factor != 1.0:
            full = {"rope_type": "linear", "rope_theta": float(self.rope_theta), "factor": self.rope_scaling_factor}
        q = self.query_pre_attn_scalar
        return {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": float(f"{self.rms_norm_eps:.7g}"),  # GGUF stores float32: 1e-6 reads as 9.99999997e-7
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": {
                "full_attention": full,
                "sliding_attention": {"rope_type": "default", "rope_theta": float(self.rope_local_base_freq)},
            },
            # transformers types it int; llama.cpp derives it from head_dim unless attention.scale says else
            "query_pre_attn_scalar": int(q) if float(q).is_integer() else float(q),
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "final_logit_softcapping": self.final_logit_softcapping,
            "attn_logit_softcapping": None,
            "attention_bias": bool(self.attention_bias),
            "hidden_activation": self.hidden_activation,
            "tie_word_embeddings": bool(self.tie_word_embeddings),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }


# RMSNorm in float32 scaled by (1 + weight) (Gemma's zero-centred weights): the shared layer
Gemma3RMSNorm = GemmaRMSNorm


class Gemma3Rotary(nn.Module):
    """NeoX-style ("rotate half") rotary embedding over the whole head.

    The frequency table is derived, never loaded: it lives in a per-device cache, not in a buffer, so a model
    built on `meta` and filled by a loader needs no re-initialisation.
    """

    def __init__(self, head_dim: int, base: float, scaling_factor: float = 1.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.scaling_factor = scaling_factor
        self._inv_freq: dict[torch.device, Tensor] = {}

    def inv_freq(self, device: torch.device) -> Tensor:
        if device not in self._inv_freq:
            # same expression as transformers' default/linear rope init, for bit-equal angles
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim
            self._inv_freq[device] = 1.0 / (self.base**exponent) / self.scaling_factor
        return self._inv_freq[device]

    def tables(self, positions: Tensor, dtype: torch.dtype) -> RopeTables:
        """positions [T] -> rotation tables for every layer using this rope (computed once per forward)."""
        freqs = positions[:, None].float() * self.inv_freq(positions.device)[None, :]  # [T, D/2]
        return rope_tables(freqs.cos().to(dtype), freqs.sin().to(dtype), self.head_dim, interleaved=False)

    def forward(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        # q: [T, H, D], k: [T, KV, D], positions: [T]
        rope = self.tables(positions, q.dtype)
        return apply_rope(q, rope), apply_rope(k, rope)


class Gemma3Attention(nn.Module):
    def __init__(self, config: Gemma3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = Gemma3RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = Gemma3RMSNorm(self.head_dim, config.rms_norm_eps)
        sliding = self.layer_type == SLIDING
        if sliding:
            self.rotary = Gemma3Rotary(self.head_dim, config.rope_local_base_freq)
        else:
            self.rotary = Gemma3Rotary(self.head_dim, config.rope_theta, config.rope_scaling_factor)
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            scale=config.query_pre_attn_scalar**-0.5,
            sliding_window=config.sliding_window if sliding else None,
        )

    def forward(self, x: Tensor, rope: RopeTables, ctx: AttentionContext) -> Tensor:
        # x: [T, D]; rope: this layer type's tables for the step
        t = x.shape[0]
        q = apply_rope(self.q_proj(x).view(t, self.num_heads, self.head_dim), rope, self.q_norm)
        k = apply_rope(self.k_proj(x).view(t, self.num_kv_heads, self.head_dim), rope, self.k_norm)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        out = self.attn(q, k, v, ctx)  # [T, H, Dh]
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class Gemma3MLP(nn.Module):
    def __init__(self, config: Gemma3Config) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: Gemma3Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Gemma3Attention(config, layer_idx)
        self.mlp = Gemma3MLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = Gemma3RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = Gemma3RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = Gemma3RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = Gemma3RMSNorm(config.hidden_size, eps)

    def forward(self, h: Tensor, rope: RopeTables, ctx: AttentionContext) -> Tensor:
        # h: [T, D]; residual + post-norm + the next pre-norm in one step each (one fused call on CPU float32)
        a = self.self_attn(self.input_layernorm(h), rope, ctx)
        h, x = add_norm(h, a, self.post_attention_layernorm, self.pre_feedforward_layernorm)
        assert x is not None
        return add_norm(h, self.mlp(x), self.post_feedforward_layernorm)[0]


class Gemma3TextModel(nn.Module):
    def __init__(self, config: Gemma3Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Gemma3RMSNorm(config.hidden_size, config.rms_norm_eps)


class Gemma3ForCausalLM(nn.Module):
    """Implements `autoglm.models.base.DecoderModel`.

    With tied embeddings there is no `lm_head` module: logits use `model.embed_tokens` (dense weight, or a GGUF
    embedding's quantized rows through its `as_logits`) so the big matrix is held once.
    """

    uses_mrope = False
    position_rows = 1

    def __init__(self, config: Gemma3Config) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.max_position_embeddings = config.max_position_embeddings
        # HF multiplies by sqrt(hidden) rounded to the weight dtype; we keep the float value and round the same way
        self.embed_scale = math.sqrt(config.hidden_size)
        self.model = Gemma3TextModel(config)
        self.lm_head: nn.Module | None = (
            None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def prompt_positions(self, num_tokens: int, spans: Sequence[MediaSpan]) -> PromptPositions:
        return rope_positions(num_tokens, spans)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        # input_ids: [T] -> [T, D]
        emb = self.model.embed_tokens(input_ids)
        return emb * torch.tensor(self.embed_scale, dtype=emb.dtype)

    def forward(
        self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext, inputs_embeds: Tensor | None = None
    ) -> Tensor:
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [T, D]
        if positions.dim() == 2:  # a 3-row M-RoPE layout from a generic caller: text rows are all equal
            positions = positions[0]
        ropes: dict[str, RopeTables] = {}  # angles once per step per rope base, shared by the layers
        for layer in self.model.layers:
            attn = layer.self_attn
            rope = ropes.get(attn.layer_type)
            if rope is None:
                rope = ropes[attn.layer_type] = attn.rotary.tables(positions, h.dtype)
            h = layer(h, rope, ctx)
        return self.model.norm(h)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        # hidden: [N, D] -> [N, V] float32
        if self.lm_head is not None:
            logits = self.lm_head(hidden)
        else:
            emb = self.model.embed_tokens
            as_logits = getattr(emb, "as_logits", None)  # GGUFEmbedding: matmul over the quantized rows
            logits = as_logits(hidden) if as_logits is not None else F.linear(hidden, emb.weight.to(hidden.dtype))
        logits = logits.float()
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


# --- the architecture interface (autoglm.models.registry) --------------------------------------------------------
GGUF_ARCH = "gemma3"
Fixup = Callable[[str, Tensor], Tensor]


def from_hf(config: dict[str, Any], *, no_vision: bool = False) -> Gemma3ForCausalLM:
    # Gemma 3 parses its own config.json fields (per-layer-type RoPE, sliding window pattern).
    return Gemma3ForCausalLM(Gemma3Config.from_dict(config))


def from_gguf(f: GGUFFile) -> Gemma3ForCausalLM:
    return Gemma3ForCausalLM(Gemma3Config.from_gguf(f))


def gguf_fixups(model: nn.Module) -> Fixup:
    """llama.cpp's converter stores every norm weight as 1 + w (Gemma's zero-centred weights): undo it."""
    return lambda name, t: t - 1.0 if name.endswith("norm.weight") else t


def hf_config(model: nn.Module) -> dict[str, Any]:
    return model.config.to_hf()  # type: ignore[union-attr,operator]
