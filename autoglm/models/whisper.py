"""Whisper encoder-decoder (WhisperForConditionalGeneration) in plain PyTorch, HF attribute names.

Encoder: two GELU convolutions (the second strides by 2: 3000 mel frames -> 1500 positions), fixed sinusoidal
positions, pre-LayerNorm transformer layers. Decoder: learned positions, causal self-attention with a preallocated
KV cache, cross-attention whose K/V are projected once per clip (`cross_kv`) and shared by every beam, logits tied to
the token embeddings. Built on `meta` and filled from safetensors or CTranslate2 (`autoglm.loader.ct2`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoglm.errors import ConfigError, UnsupportedArchitecture, WeightMismatch
from autoglm.loader.ct2 import Ct2File


@dataclass
class WhisperConfig:
    vocab_size: int = 51865
    num_mel_bins: int = 80
    d_model: int = 512
    encoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_layers: int = 6
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    max_source_positions: int = 1500
    max_target_positions: int = 448
    activation_function: str = "gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> WhisperConfig:
        """From a transformers config.json dict; unknown keys are ignored, the activation is checked."""
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        if cfg.activation_function != "gelu":
            raise ConfigError(f"Whisper activation_function {cfg.activation_function!r} is not supported (gelu)")
        for name in ("encoder", "decoder"):
            heads = getattr(cfg, f"{name}_attention_heads")
            if cfg.d_model % heads:
                raise ConfigError(f"Whisper d_model {cfg.d_model} is not divisible by {name}_attention_heads {heads}")
        return cfg

    @property
    def multilingual(self) -> bool:
        # openai-whisper's rule: English-only checkpoints have 51864 tokens, multilingual ones more
        return self.vocab_size >= 51865


class WhisperAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def heads(self, x: Tensor) -> Tensor:
        # x: [B, T, D] -> [B, H, T, Dh]
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads(self.k_proj(x)), self.heads(self.v_proj(x))

    def attend(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        # x: [B, T, D]; k, v: [B, H, S, Dh] -> [B, T, D]
        b, t, d = x.shape
        q = self.heads(self.q_proj(x))
        # q scaled before the product as HF does (same rounding as transformers' eager path)
        o = F.scaled_dot_product_attention(q * self.scaling, k, v, attn_mask=mask, is_causal=causal, scale=1.0)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, d))


class WhisperEncoderLayer(nn.Module):
    def __init__(self, cfg: WhisperConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.self_attn = WhisperAttention(d, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        h = self.self_attn_layer_norm(x)
        k, v = self.self_attn.project_kv(h)
        x = x + self.self_attn.attend(h, k, v)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    def __init__(self, cfg: WhisperConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(WhisperEncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, input_features: Tensor) -> Tensor:
        # input_features: [B, n_mels, 2 * S] -> [B, S, D]
        x = F.gelu(self.conv1(input_features))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.embed_positions.weight[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


@dataclass
class DecoderCache:
    """Per-layer K/V. Self-attention K/V are preallocated [B, H, max_len, Dh] and filled up to `length`; the
    cross-attention K/V [B or 1, H, S, Dh] are computed once per clip (a batch of 1 broadcasts over beams)."""

    self_k: list[Tensor]
    self_v: list[Tensor]
    cross_k: list[Tensor]
    cross_v: list[Tensor]
    length: int = 0

    def reorder(self, index: Tensor) -> None:
        """Beam search: row i of the cache becomes old row index[i] (self-attention only; cross K/V are shared)."""
        n = self.length
        for layer in range(len(self.self_k)):
            for buf in (self.self_k[layer], self.self_v[layer]):
                buf[:, :, :n] = buf[index, :, :n]


class WhisperDecoderLayer(nn.Module):
    def __init__(self, cfg: WhisperConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.self_attn = WhisperAttention(d, cfg.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.encoder_attn = WhisperAttention(d, cfg.decoder_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(d, cfg.decoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.decoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, cache: DecoderCache, layer: int, mask: Tensor | None, causal: bool) -> Tensor:
        # x: [B, T, D]; this step's K/V are written at cache positions [length, length + T)
        start, end = cache.length, cache.length + x.shape[1]
        h = self.self_attn_layer_norm(x)
        k, v = self.self_attn.project_kv(h)
        ck, cv = cache.self_k[layer], cache.self_v[layer]
        ck[:, :, start:end] = k
        cv[:, :, start:end] = v
        x = x + self.self_attn.attend(h, ck[:, :, :end], cv[:, :, :end], mask, causal)
        h = self.encoder_attn_layer_norm(x)
        xk, xv = cache.cross_k[layer], cache.cross_v[layer]
        if xk.shape[0] != x.shape[0]:
            xk, xv = xk.expand(x.shape[0], -1, -1, -1), xv.expand(x.shape[0], -1, -1, -1)
        x = x + self.encoder_attn.attend(h, xk, xv)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperDecoder(nn.Module):
    def __init__(self, cfg: WhisperConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.max_target_positions = cfg.max_target_positions
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        self.embed_positions = nn.Embedding(cfg.max_target_positions, d)
        self.layers = nn.ModuleList(WhisperDecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: Tensor, cache: DecoderCache) -> Tensor:
        # input_ids: [B, T] at positions [length, length + T) -> hidden [B, T, D]; advances cache.length
        t = input_ids.shape[1]
        start = cache.length
        if start + t > self.max_target_positions:
            raise ValueError(f"Whisper decoder: {start + t} positions exceed max_target_positions "
                             f"{self.max_target_positions}")
        x = self.embed_tokens(input_ids) + self.embed_positions.weight[start : start + t]
        mask, causal = None, False
        if t > 1 and start == 0:
            causal = True
        elif t > 1:
            # query i sees the cached prefix and itself: True = attend
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i, mask, causal)
        cache.length = start + t
        return self.layer_norm(x)


class WhisperModel(nn.Module):
    def __init__(self, cfg: WhisperConfig) -> None:
        super().__init__()
        self.encoder = WhisperEncoder(cfg)
        self.decoder = WhisperDecoder(cfg)


class WhisperForConditionalGeneration(nn.Module):
    """The full model. Inference API: `encode` -> `new_cache` -> `decode` steps; `forward` for parity tests."""

    def __init__(self, cfg: WhisperConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = WhisperModel(cfg)
        self.proj_out = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def tied_parameters(self) -> dict[str, str]:
        return {"proj_out.weight": "model.decoder.embed_tokens.weight"}

    def tie_weights(self) -> None:
        self.proj_out.weight = self.model.decoder.embed_tokens.weight

    @torch.inference_mode()
    def encode(self, input_features: Tensor) -> Tensor:
        """input_features [B, n_mels, 3000] -> encoder states [B, 1500, D]."""
        dtype = self.model.encoder.conv1.weight.dtype
        return self.model.encoder(input_features.to(dtype))

    @torch.inference_mode()
    def new_cache(self, encoder_states: Tensor, batch: int, max_len: int | None = None) -> DecoderCache:
        """A cache for `batch` decoder rows over `encoder_states` [B_enc, S, D] (B_enc = batch, or 1 shared)."""
        dec = self.model.decoder
        max_len = min(max_len or dec.max_target_positions, dec.max_target_positions)
        attn0 = dec.layers[0].self_attn
        shape = (batch, attn0.num_heads, max_len, attn0.head_dim)
        like = encoder_states
        cross = [layer.encoder_attn.project_kv(encoder_states) for layer in dec.layers]
        return DecoderCache(
            self_k=[like.new_zeros(shape) for _ in dec.layers],
            self_v=[like.new_zeros(shape) for _ in dec.layers],
            cross_k=[k for k, _ in cross],
            cross_v=[v for _, v in cross],
        )

    @torch.inference_mode()
    def decode(self, input_ids: Tensor, cache: DecoderCache, *, last_only: bool = True) -> Tensor:
        """input_ids [B, T] -> logits float32 [B, V] (last position) or [B, T, V]."""
        h = self.model.decoder(input_ids, cache)
        if last_only:
            h = h[:, -1]
        return self.proj_out(h).float()

    @torch.inference_mode()
    def forward(self, input_features: Tensor, decoder_input_ids: Tensor) -> Tensor:
        """Teacher-forced logits [B, T, V] (what transformers' forward returns)."""
        enc = self.encode(input_features)
        cache = self.new_cache(enc, decoder_input_ids.shape[0], decoder_input_ids.shape[1])
        return self.decode(decoder_input_ids, cache, last_only=False)


# --- CTranslate2 names (WhisperSpec) -> ours ---------------------------------------------------------------------
_CT2_GELU = 3  # ctranslate2 Activation.GELU (erf form, what Whisper uses)


def config_from_ct2(f: Ct2File) -> WhisperConfig:
    """A WhisperSpec file's dimensions -> WhisperConfig (CT2's config.json holds no dimensions)."""
    if f.spec != "WhisperSpec":
        raise UnsupportedArchitecture(f"{f.path}: CTranslate2 spec {f.spec!r} is not a Whisper model (WhisperSpec)")
    for name, want in (("decoder/activation", _CT2_GELU), ("decoder/pre_norm", 1), ("decoder/alibi", 0),
                       ("decoder/scale_embeddings", 0)):
        if name in f and f.scalar(name) != want:
            raise UnsupportedArchitecture(f"{f.path}: {name} = {f.scalar(name)} (this Whisper needs {want})")
    emb = f.resolve("decoder/embeddings/weight").shape
    conv1 = f.resolve("encoder/conv1/weight").shape

    def n_layers(side: str) -> int:
        return len({n.split("/")[1] for n in f.variables if re.match(rf"{side}/layer_\d+/", n)})

    return WhisperConfig(
        vocab_size=emb[0],
        num_mel_bins=conv1[1],
        d_model=emb[1],
        encoder_layers=n_layers("encoder"),
        encoder_attention_heads=int(f.scalar("encoder/num_heads")),
        decoder_layers=n_layers("decoder"),
        decoder_attention_heads=int(f.scalar("decoder/num_heads")),
        encoder_ffn_dim=f.resolve("encoder/layer_0/ffn/linear_0/weight").shape[0],
        decoder_ffn_dim=f.resolve("decoder/layer_0/ffn/linear_0/weight").shape[0],
        max_source_positions=f.resolve("encoder/position_encodings/encodings").shape[0],
        max_target_positions=f.resolve("decoder/position_encodings/encodings").shape[0],
    )


def ct2_tensors(f: Ct2File, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, Tensor]]:
    """Yield (our parameter name, tensor) for every WhisperSpec variable; fused QKV / KV projections are split and
    int8/float16 weights dequantized to `dtype`. The tied output projection is checked, not yielded."""
    cfg = config_from_ct2(f)

    def get(name: str) -> Tensor:
        return f.float_tensor(name, dtype)

    def linear(src: str, dst: str) -> Iterator[tuple[str, Tensor]]:
        yield f"{dst}.weight", get(f"{src}/weight")
        yield f"{dst}.bias", get(f"{src}/bias")

    def norm(src: str, dst: str) -> Iterator[tuple[str, Tensor]]:
        yield f"{dst}.weight", get(f"{src}/gamma")
        yield f"{dst}.bias", get(f"{src}/beta")

    def split(src: str, dst: str, parts: tuple[str, ...]) -> Iterator[tuple[str, Tensor]]:
        w, b = get(f"{src}/weight"), get(f"{src}/bias")
        for i, (wp, bp) in enumerate(zip(w.chunk(len(parts)), b.chunk(len(parts)), strict=True)):
            yield f"{dst}.{parts[i]}.weight", wp
            if parts[i] == "k_proj":
                # HF Whisper's k_proj has no bias; CTranslate2 stores zeros there
                if bp.abs().max().item() != 0.0:
                    raise WeightMismatch(f"{f.path}: {src}/bias has a non-zero key bias, which Whisper lacks")
            else:
                yield f"{dst}.{parts[i]}.bias", bp

    for side in ("encoder", "decoder"):
        n_layers = cfg.encoder_layers if side == "encoder" else cfg.decoder_layers
        ours = f"model.{side}"
        yield f"{ours}.embed_positions.weight", get(f"{side}/position_encodings/encodings")
        yield from norm(f"{side}/layer_norm", f"{ours}.layer_norm")
        for i in range(n_layers):
            src, dst = f"{side}/layer_{i}", f"{ours}.layers.{i}"
            yield from norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            yield from split(f"{src}/self_attention/linear_0", f"{dst}.self_attn", ("q_proj", "k_proj", "v_proj"))
            yield from linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
            if side == "decoder":
                yield from norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
                yield from linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
                yield from split(f"{src}/attention/linear_1", f"{dst}.encoder_attn", ("k_proj", "v_proj"))
                yield from linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
            yield from norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
            yield from linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
            yield from linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
    yield from linear("encoder/conv1", "model.encoder.conv1")
    yield from linear("encoder/conv2", "model.encoder.conv2")
    yield "model.decoder.embed_tokens.weight", get("decoder/embeddings/weight")
    proj = "decoder/projection/weight"
    if proj in f and f.resolve(proj).name != f.resolve("decoder/embeddings/weight").name:
        if not torch.equal(get(proj), get("decoder/embeddings/weight")):
            raise UnsupportedArchitecture(f"{f.path}: {proj} differs from the embeddings (untied output projection)")
    if "decoder/projection/bias" in f and get("decoder/projection/bias").abs().max().item() != 0.0:
        raise UnsupportedArchitecture(f"{f.path}: decoder/projection/bias is non-zero (Whisper has none)")
