"""GLM-4 text decoder (Glm4ForCausalLM) and the GLM-4.1V text model (3-row M-RoPE), in plain PyTorch.

Attribute names follow transformers (`model.layers.N.self_attn.q_proj`, `mlp.gate_up_proj`, ...) so HF checkpoints
load by name. Both classes run a packed batch: all new tokens of all sequences along one axis `T`, split by the
`AttentionContext`; K/V caches are attached by the engine to each layer's `Attention` module.
Differences from LLaMA: sandwich norms (post_self_attn / post_mlp), partial rotary (first half of each head) with
*interleaved* pairs (0,1), (2,3), ..., q/k/v bias, fused gate_up_proj.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from autoglm.errors import ConfigError
from autoglm.layers.activation import GatedActivation
from autoglm.layers.attention import Attention, AttentionContext
from autoglm.layers.linear import Linear
from autoglm.layers.norm import RMSNorm, add_norm
from autoglm.layers.rotary import RopeTables, RotaryEmbedding, apply_rope
from autoglm.models.config import TextConfig, gguf_need
from autoglm.models.positions import MediaSpan, PromptPositions, mrope_positions, rope_positions

if TYPE_CHECKING:
    from autoglm.gguf.reader import GGUFFile

Fixup = Callable[[str, Tensor], Tensor]


class Glm4MLP(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = GatedActivation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        # x: [T, D] -> [T, D]
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class Glm4Attention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        assert config.head_dim is not None and config.num_key_value_heads is not None
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d, hd = config.hidden_size, config.head_dim
        self.q_proj = Linear(d, self.num_heads * hd, bias=config.attention_bias)
        self.k_proj = Linear(d, self.num_kv_heads * hd, bias=config.attention_bias)
        self.v_proj = Linear(d, self.num_kv_heads * hd, bias=config.attention_bias)
        self.o_proj = Linear(self.num_heads * hd, d, bias=False)
        self.attn = Attention(self.num_heads, self.num_kv_heads, hd, scale=hd**-0.5)

    def forward(self, x: Tensor, rope: RopeTables, ctx: AttentionContext) -> Tensor:
        # x: [T, D]; rope: this step's tables (shared by all layers)
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        o = self.attn(q, k, v, ctx)  # [T, H, hd]
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class Glm4DecoderLayer(nn.Module):
    """Sandwich-norm block: x + post_self_attn_norm(attn(input_norm(x))), then the same around the MLP."""

    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Glm4Attention(config, layer_idx)
        self.mlp = Glm4MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, x: Tensor, rope: RopeTables, ctx: AttentionContext) -> Tensor:
        # x: [T, D]
        h = self.self_attn(self.input_layernorm(x), rope, ctx)
        x, hn = add_norm(x, h, self.post_self_attn_layernorm, self.post_attention_layernorm)
        assert hn is not None
        return add_norm(x, self.mlp(hn), self.post_mlp_layernorm)[0]


class Glm4Model(nn.Module):
    """Embedding + decoder layers + final norm (HF `Glm4Model`; with `mrope_section`, HF `Glm4vTextModel`).

    forward(input_ids [T], positions [T] | [3, T], ctx, inputs_embeds [T, D] | None) -> normed hidden [T, D].
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.uses_mrope = config.uses_mrope
        assert config.head_dim is not None
        self.head_dim = config.head_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Glm4DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.rotary_dim,
            config.rope_theta,
            interleaved=True,
            mrope_section=config.mrope_section,
            scaling=config.rope_scaling_factor,
        )

    def forward(
        self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext, inputs_embeds: Tensor | None = None
    ) -> Tensor:
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [T, D]
        # Angles once per step, shared by every layer.
        rope = self.rotary_emb.tables(positions, h.dtype, self.head_dim)  # [T, 1, head_dim] each
        for layer in self.layers:
            h = layer(h, rope, ctx)
        return self.norm(h)


class Glm4vTextModel(Glm4Model):
    """The GLM-4.1V text model: `Glm4Model` with M-RoPE (positions [3, T]; a 1-D [T] is taken as text-only).

    autoglm.models.glm4v holds it as `language_model` beside `visual` and `lm_head`.
    """

    def __init__(self, config: TextConfig) -> None:
        if not config.uses_mrope:
            raise ConfigError("Glm4vTextModel needs a config with mrope_section (model_type glm4v_text)")
        super().__init__(config)


class Glm4ForCausalLM(nn.Module):
    """HF `Glm4ForCausalLM`: `model` + `lm_head`. Implements autoglm.models.base.DecoderModel.

    Built from a config with `mrope_section` it is the GLM-4.1V text model with its head (uses_mrope=True).
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Glm4vTextModel(config) if config.uses_mrope else Glm4Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.uses_mrope = config.uses_mrope
        self.position_rows = 3 if config.uses_mrope else 1
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.max_position_embeddings = config.max_position_embeddings
        if config.tie_word_embeddings:
            self.tie_weights()

    def prompt_positions(self, num_tokens: int, spans: Sequence[MediaSpan]) -> PromptPositions:
        return mrope_positions(num_tokens, spans) if self.uses_mrope else rope_positions(num_tokens, spans)

    def tied_parameters(self) -> dict[str, str]:
        """Parameters that are another parameter (name -> source name); loaders fill only the source."""
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.config.tie_word_embeddings else {}

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext, inputs_embeds: Tensor | None = None
    ) -> Tensor:
        return self.model(input_ids, positions, ctx, inputs_embeds)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        # hidden: [N, D] -> [N, vocab] float32 (sampling wants full precision)
        return self.lm_head(hidden).float()


# --- the architecture interface (autoglm.models.registry) --------------------------------------------------------
GGUF_ARCH = "glm4"


def from_hf(config: dict[str, Any], *, no_vision: bool = False) -> Glm4ForCausalLM:
    return Glm4ForCausalLM(TextConfig.from_dict(config))


def args_from_gguf(f: GGUFFile) -> TextConfig:
    """GGUF `glm4.*` metadata -> TextConfig (GLM-4.1V's text model when `rope.dimension_sections` is set)."""
    a = "glm4"
    hidden = int(gguf_need(f, f"{a}.embedding_length"))
    heads = int(gguf_need(f, f"{a}.attention.head_count"))
    head_dim = int(f.get(f"{a}.attention.key_length", hidden // heads))
    rot = int(f.get(f"{a}.rope.dimension_count", head_dim // 2))
    sections = f.get(f"{a}.rope.dimension_sections")
    mrope = [int(x) for x in sections[:3]] if sections is not None and any(int(x) for x in sections) else None
    embd = f.tensors.get("token_embd.weight")
    if embd is None:
        raise ConfigError(f"{f.path}: GGUF has no token_embd.weight")
    return TextConfig(
        model_type="glm4v_text" if mrope else "glm4",
        vocab_size=embd.shape[0],
        hidden_size=hidden,
        intermediate_size=int(gguf_need(f, f"{a}.feed_forward_length")),
        num_hidden_layers=int(gguf_need(f, f"{a}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(f.get(f"{a}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(f.get(f"{a}.context_length", 131072)),
        rms_norm_eps=float(f.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        attention_bias="blk.0.attn_q.bias" in f.tensors,
        tie_word_embeddings="output.weight" not in f.tensors,
        rope_theta=float(f.get(f"{a}.rope.freq_base", 10000.0)),
        partial_rotary_factor=rot / head_dim,
        mrope_section=mrope,
        rope_type="mrope" if mrope else "default",
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=f.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=f.get("tokenizer.ggml.padding_token_id"),
    )


def from_gguf(f: GGUFFile) -> Glm4ForCausalLM:
    return Glm4ForCausalLM(args_from_gguf(f))


def interleave_index(n_heads: int, head_dim: int, rotary_dim: int, *, to_interleaved: bool = True) -> Tensor:
    """Row gather index over q/k rows [H*hd]: per head, the first `rotary_dim` rows go from NeoX halves (evens
    first, then odds: llama.cpp's M-RoPE layout) to interleaved pairs, or back with to_interleaved=False."""
    half = rotary_dim // 2
    per_head = torch.arange(head_dim)
    if to_interleaved:
        per_head[0:rotary_dim:2] = torch.arange(half)  # even dims came first
        per_head[1:rotary_dim:2] = half + torch.arange(half)  # then the odd ones
    else:
        per_head[:rotary_dim] = torch.cat([torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2)])
    return (torch.arange(n_heads)[:, None] * head_dim + per_head[None, :]).reshape(-1)


def _qk_fixup(model: nn.Module, *, to_interleaved: bool) -> Fixup:
    cfg = model.config  # type: ignore[union-attr]
    if not cfg.uses_mrope:  # plain GLM-4: llama.cpp runs it with our (interleaved) layout
        return lambda _name, t: t
    hd, rot = int(cfg.head_dim), int(cfg.rotary_dim)

    def fix(name: str, t: Tensor) -> Tensor:
        if name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            # works on raw GGUF block rows too: a row of blocks moves as a unit
            return t.index_select(0, interleave_index(t.shape[0] // hd, hd, rot, to_interleaved=to_interleaved))
        return t

    return fix


def gguf_fixups(model: nn.Module) -> Fixup:
    """GLM-4.1V text (M-RoPE): q/k rows back from llama.cpp's NeoX order to HF's interleaved pairs."""
    return _qk_fixup(model, to_interleaved=True)


def gguf_export_fixups(model: nn.Module) -> Fixup:
    """GLM-4.1V text (M-RoPE): q/k rows from HF's interleaved pairs to the NeoX order llama.cpp's kernel wants."""
    return _qk_fixup(model, to_interleaved=False)


def hf_config(model: nn.Module) -> dict[str, Any]:
    """transformers `Glm4Config` dict for a plain GLM-4 model (GLM-4.1V's M-RoPE text model has no text-only class)."""
    from autoglm.errors import UnsupportedArchitecture

    tc: TextConfig = model.config  # type: ignore[assignment]
    if tc.uses_mrope:
        raise UnsupportedArchitecture(
            "a GLM-4.1V text GGUF (M-RoPE) has no text-only HF architecture to export to",
            param="glm4.rope.dimension_sections",
        )
    assert tc.head_dim is not None
    return {
        "architectures": ["Glm4ForCausalLM"],
        "model_type": "glm4",
        "vocab_size": tc.vocab_size,
        "hidden_size": tc.hidden_size,
        "intermediate_size": tc.intermediate_size,
        "num_hidden_layers": tc.num_hidden_layers,
        "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_key_value_heads,
        "head_dim": tc.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": tc.rms_norm_eps,
        "max_position_embeddings": tc.max_position_embeddings,
        "attention_bias": bool(tc.attention_bias),
        "tie_word_embeddings": bool(tc.tie_word_embeddings),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(tc.rope_theta),
            "partial_rotary_factor": tc.rotary_dim / tc.head_dim,
        },
        "partial_rotary_factor": tc.rotary_dim / tc.head_dim,
        "bos_token_id": tc.bos_token_id,
        "eos_token_id": tc.eos_token_id,
        "pad_token_id": tc.pad_token_id,
    }


__all__ = ["Glm4ForCausalLM", "Glm4Model", "Glm4vTextModel", "Glm4DecoderLayer", "Glm4Attention", "Glm4MLP"]
