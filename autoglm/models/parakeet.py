"""NeMo FastConformer CTC (Parakeet-CTC) in plain PyTorch, with transformers 5.x `ParakeetForCTC` attribute names.

Architecture (Rekesh et al. 2023, "Fast Conformer"): a depthwise-striding 2-D conv subsampling (8x in time and
frequency), then Conformer blocks — half-step macaron FFN, relative-position multi-head self-attention
(Transformer-XL: content bias u, position bias v, rel-shift), a conv module (pointwise GLU, depthwise conv,
BatchNorm, activation, pointwise), a second half-step FFN, LayerNorm — and a 1x1 conv CTC head.

Padding is handled with lengths, not attention-mask tensors: every stage zeroes the frames past each clip's
length, so a clip's log-probs do not depend on the clips batched with it. Traceable for ONNX export (no
data-dependent Python control flow in `forward`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoglm.errors import ConfigError

ARCHITECTURES = ("ParakeetForCTC",)
_ACTS = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu}


@dataclass(frozen=True)
class ParakeetConfig:
    """`config.json` of a transformers `ParakeetForCTC` (the encoder fields live in `encoder_config`)."""

    vocab_size: int = 1025
    pad_token_id: int = 1024  # the CTC blank
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 8
    intermediate_size: int = 4096
    hidden_act: str = "silu"
    attention_bias: bool = True
    convolution_bias: bool = True
    conv_kernel_size: int = 9
    subsampling_factor: int = 8
    subsampling_conv_channels: int = 256
    subsampling_conv_kernel_size: int = 3
    subsampling_conv_stride: int = 2
    num_mel_bins: int = 80
    scale_input: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_subsampling_layers(self) -> int:
        return int(math.log2(self.subsampling_factor))

    @classmethod
    def from_dict(cls, config: dict[str, Any], *, source: str = "config.json") -> ParakeetConfig:
        archs = config.get("architectures") or []
        if archs and not any(a in ARCHITECTURES for a in archs):
            raise ConfigError(f"{source}: architectures {archs} is not a CTC Parakeet ({', '.join(ARCHITECTURES)})")
        enc = config.get("encoder_config")
        if not isinstance(enc, dict):
            raise ConfigError(f"{source}: ParakeetForCTC config without an `encoder_config` object")
        names = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in enc.items() if k in names}
        for k in ("vocab_size", "pad_token_id"):
            if config.get(k) is not None:
                kw[k] = config[k]
        cfg = cls(**kw)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError(
                f"{source}: hidden_size {cfg.hidden_size} not divisible by {cfg.num_attention_heads} heads"
            )
        if cfg.hidden_act not in _ACTS:
            raise ConfigError(f"{source}: hidden_act {cfg.hidden_act!r} not supported ({', '.join(_ACTS)})")
        if 2**cfg.num_subsampling_layers != cfg.subsampling_factor:
            raise ConfigError(f"{source}: subsampling_factor {cfg.subsampling_factor} is not a power of 2")
        if not 0 <= cfg.pad_token_id < cfg.vocab_size:
            raise ConfigError(
                f"{source}: pad_token_id (the CTC blank) {cfg.pad_token_id} outside vocab {cfg.vocab_size}"
            )
        return cfg


def _pointwise(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """A kernel-1 Conv1d applied to [B, T, C_in] -> [B, T, C_out]."""
    return F.linear(x, conv.weight[:, :, 0], conv.bias)


def _time_mask(lengths: Tensor, t: int) -> Tensor:
    """[B] lengths -> [B, t] bool, True on valid frames."""
    return torch.arange(t, device=lengths.device)[None, :] < lengths[:, None]


class ParakeetEncoderSubsamplingConv2D(nn.Module):
    """[B, T, mels] -> [B, T / factor, hidden]: a strided conv, then (depthwise strided, pointwise) pairs, ReLUs."""

    def __init__(self, cfg: ParakeetConfig) -> None:
        super().__init__()
        k, s, c = cfg.subsampling_conv_kernel_size, cfg.subsampling_conv_stride, cfg.subsampling_conv_channels
        self.kernel_size, self.stride, self.padding = k, s, (k - 1) // 2
        # same list layout as transformers (ReLUs included) so the checkpoint indices match
        layers: list[nn.Module] = [nn.Conv2d(1, c, k, stride=s, padding=self.padding), nn.ReLU()]
        for _ in range(cfg.num_subsampling_layers - 1):
            layers += [nn.Conv2d(c, c, k, stride=s, padding=self.padding, groups=c), nn.Conv2d(c, c, 1), nn.ReLU()]
        self.layers = nn.ModuleList(layers)
        self.linear = nn.Linear(c * (cfg.num_mel_bins // s**cfg.num_subsampling_layers), cfg.hidden_size)

    def _first_conv(self, conv: nn.Conv2d, x: Tensor) -> Tensor:
        """The 1-channel input conv as patches @ weight: oneDNN's direct conv is ~20x slower with C_in = 1.

        x [B, 1, T, F] -> [B, C, T', F'] (a channels-last view; later convs accept it)."""
        k, s, p = self.kernel_size, self.stride, self.padding
        xp = F.pad(x[:, 0], (p, p, p, p))  # [B, T + 2p, F + 2p]
        last = xp[:, k - 1 :: s, k - 1 :: s]  # the shortest tap fixes the output size
        t, f = last.shape[1], last.shape[2]
        taps = [xp[:, i::s, j::s][:, :t, :f] for i in range(k) for j in range(k)]
        patches = torch.stack(taps, dim=-1)  # [B, T', F', k*k], taps in the weight's (kh, kw) order
        out = F.linear(patches, conv.weight.reshape(conv.out_channels, k * k), conv.bias)  # [B, T', F', C]
        return out.permute(0, 3, 1, 2)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        for layer in self.layers:
            if isinstance(layer, nn.Conv2d) and layer.stride != (1, 1):
                lengths = (lengths + 2 * self.padding - self.kernel_size) // self.stride + 1
        return lengths

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = features.unsqueeze(1)  # [B, 1, T, mels]
        for i, layer in enumerate(self.layers):
            if isinstance(layer, nn.ReLU):
                x = F.relu_(x)  # in place: the first conv's output is the largest activation of the model
                continue
            # onnxruntime's own Conv is fast at C_in = 1; the patch graph would only slow it down
            x = self._first_conv(layer, x) if i == 0 and not torch.onnx.is_in_onnx_export() else layer(x)
            if layer.stride != (1, 1):
                lengths = (lengths + 2 * self.padding - self.kernel_size) // self.stride + 1
            # zero the frames past each clip so the next conv sees what a lone clip's zero padding gives
            x = x.mul_(_time_mask(lengths, x.shape[2])[:, None, :, None].to(x.dtype))
        b, c, t, f = x.shape
        return self.linear(x.transpose(1, 2).reshape(b, t, c * f)), lengths  # [B, T', hidden]


class ParakeetEncoderFeedForward(nn.Module):
    def __init__(self, cfg: ParakeetConfig) -> None:
        super().__init__()
        self.linear1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.attention_bias)
        self.linear2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.act = _ACTS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.act(self.linear1(x)))


class BatchNorm1d(nn.Module):
    """Inference BatchNorm over channels of [B, C, T]; holds only the four tensors a checkpoint needs
    (`num_batches_tracked` is training state and is dropped on load)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ParakeetEncoderConvolutionModule(nn.Module):
    def __init__(self, cfg: ParakeetConfig) -> None:
        super().__init__()
        d, k, bias = cfg.hidden_size, cfg.conv_kernel_size, cfg.convolution_bias
        self.pointwise_conv1 = nn.Conv1d(d, 2 * d, 1, bias=bias)
        self.depthwise_conv = nn.Conv1d(d, d, k, padding=(k - 1) // 2, groups=d, bias=bias)
        self.norm = BatchNorm1d(d)
        self.pointwise_conv2 = nn.Conv1d(d, d, 1, bias=bias)
        self.act = _ACTS[cfg.hidden_act]

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        # 1x1 convs as linears on [B, T, C]: same math, and an ONNX MatMul that INT8 dynamic quantization covers
        h = F.glu(_pointwise(self.pointwise_conv1, x), dim=-1)  # [B, T, hidden]
        h = h * valid[:, :, None].to(h.dtype)  # padded frames must not leak into valid ones through the kernel
        h = self.act(self.norm(self.depthwise_conv(h.transpose(1, 2))))  # [B, hidden, T]
        return _pointwise(self.pointwise_conv2, h.transpose(1, 2))  # [B, T, hidden]


class ParakeetEncoderAttention(nn.Module):
    """Relative-position MHSA (Transformer-XL section 3.3): scores = (q+u)·k + rel_shift((q+v)·W_r·pos)."""

    def __init__(self, cfg: ParakeetConfig) -> None:
        super().__init__()
        d, h, bias = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_bias
        self.num_heads, self.head_dim = h, cfg.head_dim
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=bias)
        self.relative_k_proj = nn.Linear(d, d, bias=False)
        self.bias_u = nn.Parameter(torch.zeros(h, self.head_dim))
        self.bias_v = nn.Parameter(torch.zeros(h, self.head_dim))

    @staticmethod
    def rel_shift(scores: Tensor) -> Tensor:
        """[B, H, T, 2T-1] scores against relative positions T-1 .. -(T-1) -> [B, H, T, T] indexed by key."""
        b, h, t, p = scores.shape
        scores = F.pad(scores, (1, 0)).reshape(b, h, -1, t)[:, :, 1:].reshape(b, h, t, p)
        return scores[..., :t]

    def forward(self, x: Tensor, pos: Tensor, masked: Tensor) -> Tensor:
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        r = self.relative_k_proj(pos).view(1, -1, self.num_heads, self.head_dim)  # [1, 2T-1, H, hd]
        bd = (q + self.bias_v[None, :, None, :]) @ r.permute(0, 2, 3, 1)  # [B, H, T, 2T-1]
        bd = self.rel_shift(bd) * self.scaling
        bd = bd.masked_fill(masked, torch.finfo(bd.dtype).min)  # masked [B, 1, T, T]: True = padding
        out = F.scaled_dot_product_attention(q + self.bias_u[None, :, None, :], k, v, attn_mask=bd, scale=self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class ParakeetEncoderBlock(nn.Module):
    def __init__(self, cfg: ParakeetConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.feed_forward1 = ParakeetEncoderFeedForward(cfg)
        self.self_attn = ParakeetEncoderAttention(cfg)
        self.conv = ParakeetEncoderConvolutionModule(cfg)
        self.feed_forward2 = ParakeetEncoderFeedForward(cfg)
        self.norm_feed_forward1 = nn.LayerNorm(d)
        self.norm_self_att = nn.LayerNorm(d)
        self.norm_conv = nn.LayerNorm(d)
        self.norm_feed_forward2 = nn.LayerNorm(d)
        self.norm_out = nn.LayerNorm(d)

    def forward(self, x: Tensor, pos: Tensor, masked: Tensor, valid: Tensor) -> Tensor:
        x = x + 0.5 * self.feed_forward1(self.norm_feed_forward1(x))  # macaron: two half-step FFNs
        x = x + self.self_attn(self.norm_self_att(x), pos, masked)
        x = x + self.conv(self.norm_conv(x), valid)
        x = x + 0.5 * self.feed_forward2(self.norm_feed_forward2(x))
        return self.norm_out(x)


class ParakeetEncoder(nn.Module):
    def __init__(self, cfg: ParakeetConfig) -> None:
        super().__init__()
        self.config = cfg
        self.input_scale = math.sqrt(cfg.hidden_size) if cfg.scale_input else 1.0
        self.subsampling = ParakeetEncoderSubsamplingConv2D(cfg)
        self.layers = nn.ModuleList(ParakeetEncoderBlock(cfg) for _ in range(cfg.num_hidden_layers))

    def relative_positions(self, t: int | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
        """[2T-1, hidden] sinusoids for relative positions T-1 down to -(T-1), sin/cos interleaved."""
        d = self.config.hidden_size
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        positions = torch.arange(t - 1, -t, -1, device=device).to(torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [2T-1, d/2]
        return torch.stack([freqs.sin(), freqs.cos()], dim=-1).reshape(-1, d).to(dtype)

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """features [B, T, mels], lengths [B] -> (hidden [B, T', hidden], lengths [B])."""
        x, lengths = self.subsampling(features, lengths)
        x = x * self.input_scale
        t = x.shape[1]
        pos = self.relative_positions(t, x.dtype, x.device)
        valid = _time_mask(lengths, t)  # [B, T']
        masked = ~(valid[:, None, :] & valid[:, :, None]).unsqueeze(1)  # [B, 1, T', T'], True = padding pair
        for layer in self.layers:
            x = layer(x, pos, masked, valid)
        return x, lengths


class ParakeetForCTC(nn.Module):
    """FastConformer encoder + 1x1-conv CTC head. `forward` returns raw logits; `log_probs` their log-softmax."""

    def __init__(self, cfg: ParakeetConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = ParakeetEncoder(cfg)
        # a Conv1d, as in NeMo's ConvASRDecoder (weight [vocab, hidden, 1])
        self.ctc_head = nn.Conv1d(cfg.hidden_size, cfg.vocab_size, 1)

    @property
    def blank_id(self) -> int:
        return self.config.pad_token_id

    def output_lengths(self, lengths: Tensor) -> Tensor:
        return self.encoder.subsampling.output_lengths(lengths)

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """features [B, T, mels] float, lengths [B] int64 -> (logits [B, T', vocab], lengths [B])."""
        hidden, lengths = self.encoder(features.to(self.ctc_head.weight.dtype), lengths)
        return _pointwise(self.ctc_head, hidden), lengths

    def log_probs(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """As `forward`, log-softmax over the vocabulary in float32 (what NeMo's CTC decoder emits)."""
        logits, lengths = self(features, lengths)
        return torch.log_softmax(logits.float(), dim=-1), lengths
