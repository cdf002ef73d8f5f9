"""LLaMA-family decoder (Llama 2/3, SmolLM2, Mistral-style), in plain PyTorch, packed batch, HF attribute names.

The block: x + attn(input_layernorm(x)), then + mlp(post_attention_layernorm(x)); GQA; NeoX ("rotate half") RoPE
over the whole head; SiLU-gated MLP with separate gate/up projections. Variants set flags on `LlamaArgs` rather than
copying the module: q/k/v bias (Qwen2, `autoglm.models.qwen2`), per-head q/k RMSNorm before RoPE (Qwen3,
`autoglm.models.qwen3`), a sliding window (Mistral v0.1).

GGUF (`general.architecture` = llama): llama.cpp's converter permutes the q/k rows of every head from HF's NeoX
halves to interleaved pairs (its LLaMA RoPE is the "normal" one); `gguf_fixups` puts them back, `gguf_export_fixups`
does what the converter does. Qwen2/Qwen3 GGUFs keep HF's order (llama.cpp runs them NeoX-style).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from autoglm.errors import ConfigError
from autoglm.kernels.base import DecoderLayerModules, DecodeStack, Kernels, RopeOperands
from autoglm.kernels.reference import REFERENCE
from autoglm.layers.attention import Attention, AttentionContext
from autoglm.layers.linear import Linear
from autoglm.layers.norm import RMSNorm
from autoglm.layers.rotary import RopeTables, RotaryEmbedding, apply_rope
from autoglm.models.config import gguf_need, hf_text_section, known_fields, rope_settings
from autoglm.models.positions import MediaSpan, PromptPositions, rope_positions

if TYPE_CHECKING:
    from autoglm.gguf.reader import GGUFFile

Fixup = Callable[[str, Tensor], Tensor]


@dataclass
class LlamaArgs:
    """Hyper-parameters of a LLaMA-style decoder; `from_hf` reads config.json, `from_gguf` the GGUF metadata.

    Variant flags: `qkv_bias` (q/k/v projections carry a bias; Llama's `attention_bias` also biases o_proj),
    `o_bias`, `mlp_bias`, `qk_norm` (Qwen3), `sliding_window` (every layer; None = full attention).
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # "linear" RoPE scaling: positions are divided by it
    sliding_window: int | None = None
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not a positive multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})",
                param="num_key_value_heads",
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act not in ("silu", "swish"):
            raise ConfigError(f"{self.model_type}: unsupported hidden_act {self.hidden_act!r}", param="hidden_act")

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> LlamaArgs:
        """config.json dict (transformers 4.5x or 5.x spelling) -> args. Llama's `attention_bias` biases q/k/v/o."""
        d = hf_text_section(config)
        bias = bool(d.get("attention_bias", False))
        d.setdefault("qkv_bias", bias)
        d.setdefault("o_bias", bias)
        if d.get("use_sliding_window") is False:  # Qwen2/3 configs name a window they do not use
            d["sliding_window"] = None
        return cls(**known_fields(cls, {**d, **rope_settings(d)}))

    @classmethod
    def from_gguf(cls, f: GGUFFile, **overrides: Any) -> LlamaArgs:
        """GGUF metadata `<arch>.*` + tensor shapes -> args (biases and q/k norms detected from the tensors)."""
        a = f.architecture
        hidden = int(gguf_need(f, f"{a}.embedding_length"))
        heads = int(gguf_need(f, f"{a}.attention.head_count"))
        embd = f.tensors.get("token_embd.weight")
        if embd is None:
            raise ConfigError(f"{f.path}: GGUF has no token_embd.weight", param="token_embd.weight")
        scaling = f.get(f"{a}.rope.scaling.type")
        if scaling not in (None, "none", "linear"):
            raise ConfigError(f"{f.path}: unsupported {a}.rope.scaling.type {scaling!r}", param="rope.scaling.type")
        if "rope_freqs.weight" in f.tensors:
            raise ConfigError(
                f"{f.path}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1+ 'llama3' scaling) are not "
                "supported yet",
                param="rope_freqs.weight",
            )
        window = f.get(f"{a}.attention.sliding_window")
        kw: dict[str, Any] = dict(
            model_type=a,
            vocab_size=embd.shape[0],
            hidden_size=hidden,
            intermediate_size=int(gguf_need(f, f"{a}.feed_forward_length")),
            num_hidden_layers=int(gguf_need(f, f"{a}.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(f.get(f"{a}.attention.head_count_kv", heads)),
            head_dim=int(f.get(f"{a}.attention.key_length", hidden // heads)),
            max_position_embeddings=int(f.get(f"{a}.context_length", 4096)),
            rms_norm_eps=float(f.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            qkv_bias="blk.0.attn_q.bias" in f.tensors,
            o_bias="blk.0.attn_output.bias" in f.tensors,
            mlp_bias="blk.0.ffn_up.bias" in f.tensors,
            qk_norm="blk.0.attn_q_norm.weight" in f.tensors,
            tie_word_embeddings="output.weight" not in f.tensors,
            rope_theta=float(f.get(f"{a}.rope.freq_base", 10000.0)),
            rope_scaling_factor=float(f.get(f"{a}.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
            sliding_window=None if window is None else int(window),
            bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=f.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=f.get("tokenizer.ggml.padding_token_id"),
        )
        return cls(**{**kw, **overrides})

    def to_hf(self, architecture: str) -> dict[str, Any]:
        """The transformers config.json dict for these args (GGUF -> HF export)."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        if self.rope_scaling_factor != 1.0:
            rope = {"rope_type": "linear", "rope_theta": float(self.rope_theta), "factor": self.rope_scaling_factor}
        out = {
            "architectures": [architecture],
            "model_type": self.model_type,
            **{k: v for k, v in dataclasses.asdict(self).items() if k in _HF_KEYS},
            "rms_norm_eps": float(f"{self.rms_norm_eps:.7g}"),  # GGUF stores float32: 1e-6 reads as 9.99999997e-7
            "rope_parameters": rope,
            "rope_theta": float(self.rope_theta),
            "attention_bias": self.qkv_bias,
        }
        return out


_HF_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "mlp_bias", "tie_word_embeddings",
    "sliding_window", "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip


class LlamaMLP(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        d, i, b = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = Linear(d, i, bias=b)
        self.up_proj = Linear(d, i, bias=b)
        self.down_proj = Linear(i, d, bias=b)
        self.kernels: Kernels = REFERENCE  # silu * up (bound by the loader, as the norms are)

    def use_kernels(self, kernels: Kernels) -> None:
        self.kernels = kernels

    def forward(self, x: Tensor) -> Tensor:
        # x: [T, D] -> [T, D]
        return self.down_proj(self.kernels.silu_mul(self.gate_proj(x), self.up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int) -> None:
        super().__init__()
        assert args.head_dim is not None and args.num_key_value_heads is not None
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = args.head_dim
        d, hd = args.hidden_size, args.head_dim
        self.q_proj = Linear(d, self.num_heads * hd, bias=args.qkv_bias)
        self.k_proj = Linear(d, self.num_kv_heads * hd, bias=args.qkv_bias)
        self.v_proj = Linear(d, self.num_kv_heads * hd, bias=args.qkv_bias)
        self.o_proj = Linear(self.num_heads * hd, d, bias=args.o_bias)
        # Qwen3: RMSNorm over each head's q and k before RoPE
        self.q_norm = RMSNorm(hd, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(hd, args.rms_norm_eps) if args.qk_norm else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, hd, scale=hd**-0.5, sliding_window=args.sliding_window)

    def forward(self, x: Tensor, rope: RopeTables, ctx: AttentionContext) -> Tensor:
        # x: [T, D]; rope: this step's tables (shared by all layers)
        t = x.shape[0]
        q = apply_rope(self.q_proj(x).view(t, self.num_heads, self.head_dim), rope, self.q_norm)
        k = apply_rope(self.k_proj(x).view(t, self.num_kv_heads, self.head_dim), rope, self.k_norm)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        o = self.attn(q, k, v, ctx)  # [T, H, hd]
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(args, layer_idx)
        self.mlp = LlamaMLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: Tensor, rope: RopeTables, ctx: AttentionContext) -> Tensor:
        # x: [T, D] -> [T, D] (pre-norm residual block)
        x = x + self.self_attn(self.input_layernorm(x), rope, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode_modules(self) -> DecoderLayerModules:
        """This layer's modules in the shape `Kernels.decode_layers` runs (the same computation as `forward`)."""
        # through _modules: nn.Module's attribute fallback costs ~0.5 us a lookup, ~340 of them per decode step
        own = self._modules
        a, m = own["self_attn"]._modules, own["mlp"]._modules  # type: ignore[union-attr]
        return DecoderLayerModules(
            (a["q_proj"], a["k_proj"], a["v_proj"], a["o_proj"], m["gate_proj"], m["up_proj"], m["down_proj"]),
            own["input_layernorm"], own["post_attention_layernorm"], a.get("q_norm"), a.get("k_norm"), a["attn"],
        )  # type: ignore[arg-type]  # fmt: skip


class LlamaModel(nn.Module):
    """Embedding + decoder layers + final norm (HF `LlamaModel`). forward(ids [T], positions [T], ctx) -> [T, D]."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        assert args.head_dim is not None
        self.head_dim = args.head_dim
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            args.head_dim, args.rope_theta, interleaved=False, scaling=args.rope_scaling_factor
        )
        self._decode_stack: DecodeStack | None = None  # prepare_decode's operands of the one-call stack

    def forward(
        self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext, inputs_embeds: Tensor | None = None
    ) -> Tensor:
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [T, D]
        if positions.dim() == 2:  # a 3-row layout from a generic caller: text rows are all equal
            positions = positions[0]
        rope = self.rotary_emb.tables(positions, h.dtype, self.head_dim)  # once per step, shared by every layer
        fused = self._decode_in_one_call(h, rope, ctx)
        if fused is not None:
            return self.norm(fused)
        for layer in self.layers:
            h = layer(h, rope, ctx)
        return self.norm(h)

    def prepare_decode(self) -> bool:
        """Read the one-call stack's operands (`Kernels.decode_stack`) once, now, and keep them: each decode step
        then skips re-reading ~200 modules (~0.7 ms a step on a 28-layer model). The runner calls this when the
        weights are final (after `prepare_weights`), as CUDA graphs capture theirs; a module changed afterwards is
        not seen until it runs again. Without it every step reads the modules afresh. Returns whether a stack is
        kept."""
        self._decode_stack = None
        self._decode_stack = self._read_decode_stack(self.norm.kernels)
        return self._decode_stack is not None

    def _read_decode_stack(self, kernels: Kernels) -> DecodeStack | None:
        if any(layer.mlp.kernels is not kernels for layer in self.layers):  # silu * up as the modules compute it
            return None
        return kernels.decode_stack([layer.decode_modules() for layer in self.layers])

    def _decode_in_one_call(self, h: Tensor, rope: RopeTables, ctx: AttentionContext) -> Tensor | None:
        """A decode step's whole layer stack as one kernel call where the kernels have one (`Kernels.decode_layers`:
        the same ops in the same order, so bitwise the layers' forward, without the Python around ~25 small calls
        per layer, which costs more than its count suggests: the weights streaming through evict it from cache)."""
        kernels = self.norm.kernels
        if not ctx.is_decode or ctx.backend is None or rope.kernels is not kernels:
            return None
        stack = self._decode_stack
        if stack is None or stack.kernels is not kernels:
            stack = self._read_decode_stack(kernels)
            if stack is None:
                return None
        kv = ctx.backend.decode_kv(stack.attn, ctx, kernels)
        if kv is None:
            return None
        return kernels.decode_layers(h, stack, RopeOperands(rope.cos, rope.sin, rope.rotary_dim, rope.interleaved), kv)


class LlamaForCausalLM(nn.Module):
    """HF `LlamaForCausalLM` (`model` + `lm_head`); implements autoglm.models.base.DecoderModel with 1-D RoPE."""

    position_rows = 1
    uses_mrope = False

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.config = args
        self.model = LlamaModel(args)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.vocab_size = args.vocab_size
        self.hidden_size = args.hidden_size
        self.max_position_embeddings = args.max_position_embeddings
        self.tie_weights()

    def tied_parameters(self) -> dict[str, str]:
        """Parameters that are another parameter (name -> source name); loaders fill only the source."""
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.config.tie_word_embeddings else {}

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def prompt_positions(self, num_tokens: int, spans: Sequence[MediaSpan]) -> PromptPositions:
        return rope_positions(num_tokens, spans)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext, inputs_embeds: Tensor | None = None
    ) -> Tensor:
        return self.model(input_ids, positions, ctx, inputs_embeds)

    def prepare_decode(self) -> bool:
        return self.model.prepare_decode()

    def compute_logits(self, hidden: Tensor) -> Tensor:
        # hidden: [N, D] -> [N, vocab] float32
        return self.lm_head(hidden).float()


# --- the architecture interface (autoglm.models.registry) --------------------------------------------------------
def from_hf(config: dict[str, Any], *, no_vision: bool = False) -> LlamaForCausalLM:
    """A model (unfilled; build it under `torch.device("meta")`) for a Llama/Mistral config.json dict."""
    return LlamaForCausalLM(LlamaArgs.from_hf(config))


def from_gguf(f: GGUFFile) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaArgs.from_gguf(f))


def _qk_rows(model: nn.Module) -> tuple[int, int, int]:
    args = model.config  # type: ignore[union-attr]
    return int(args.num_attention_heads), int(args.num_key_value_heads), int(args.head_dim)


def _permute(t: Tensor, n_heads: int, head_dim: int, *, to_neox: bool) -> Tensor:
    """Per head, rows in interleaved pairs (0,1),(2,3).. <-> NeoX halves (0,2,..|1,3,..). Works on raw GGUF block
    rows (a row of blocks moves as a unit), so quantized q/k are permuted without decoding. t: [H*hd, ...]."""
    half = head_dim // 2
    if to_neox:  # row j of the NeoX order reads interleaved row 2j (first half) or 2(j - half) + 1
        per_head = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    else:  # row 2i reads NeoX row i, row 2i + 1 reads half + i
        per_head = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
    idx = (torch.arange(n_heads)[:, None] * head_dim + per_head[None, :]).reshape(-1)
    return t.index_select(0, idx)


def _qk_fixup(model: nn.Module, *, to_neox: bool) -> Fixup:
    heads, kv_heads, hd = _qk_rows(model)

    def fix(name: str, t: Tensor) -> Tensor:
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return _permute(t, heads, hd, to_neox=to_neox)
        if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            return _permute(t, kv_heads, hd, to_neox=to_neox)
        return t

    return fix


def gguf_fixups(model: nn.Module) -> Fixup:
    """(our name, GGUF tensor) -> our layout: q/k rows back from llama.cpp's interleaved order to HF's halves."""
    return _qk_fixup(model, to_neox=True)


def gguf_export_fixups(model: nn.Module) -> Fixup:
    """(our name, our tensor) -> the GGUF layout llama.cpp's converter writes (q/k rows interleaved per head)."""
    return _qk_fixup(model, to_neox=False)


def hf_config(model: nn.Module) -> dict[str, Any]:
    """config.json for a model built `from_gguf` (GGUF -> HF export)."""
    args: LlamaArgs = model.config  # type: ignore[assignment]
    return args.to_hf("MistralForCausalLM" if args.sliding_window else "LlamaForCausalLM")


GGUF_ARCH = "llama"

__all__ = ["LlamaArgs", "LlamaForCausalLM", "LlamaModel", "from_gguf", "from_hf", "gguf_fixups", "hf_config"]
