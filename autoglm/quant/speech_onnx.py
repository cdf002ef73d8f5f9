"""Export a FastConformer CTC model to ONNX (NeMo / sherpa-onnx signatures and metadata) and make its INT8 copy.

`export_ctc_onnx` traces `ParakeetForCTC.log_probs` behind the chosen signature (`nemo`: audio_signal [N, bins, T]
+ length -> logprobs + encoded_lengths; `sherpa`: x [N, T, bins] + x_lens -> log_probs + log_probs_len) with
dynamic batch and time axes, then writes the metadata `autoglm.loader.onnx` (and sherpa-onnx) read: vocab_size,
subsampling_factor, normalize_type, the feature settings, blank_id and the vocabulary. `quantize_int8` applies
onnxruntime's dynamic quantization to the weight MatMuls (int8 weights per output channel, uint8 activations
quantized at run time); convolutions stay float (onnxruntime's CPU ConvInteger takes uint8 weights only).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from autoglm.errors import ModelLoadError
from autoglm.models.parakeet import ParakeetForCTC
from autoglm.multimodal.fbank import FeatureRecipe
from autoglm.speech.ctc import CTCVocab

OPSET = 17


class _NemoSignature(nn.Module):
    def __init__(self, model: ParakeetForCTC) -> None:
        super().__init__()
        self.model = model

    def forward(self, audio_signal: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.log_probs(audio_signal.transpose(1, 2), length)  # [N, bins, T] -> [N, T, bins]


class _SherpaSignature(nn.Module):
    def __init__(self, model: ParakeetForCTC) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, x_lens: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.log_probs(x, x_lens)


def feature_metadata(features: FeatureRecipe) -> dict[str, str]:
    """The feature settings as ONNX metadata (`autoglm.loader.onnx.feature_recipe` reads them back)."""
    meta = {"feature_type": features.kind, "feat_dim": str(features.num_bins), "sample_rate": str(features.sample_rate)}
    if features.kind == "nemo_mel" and features.nemo is not None:
        n = features.nemo
        meta.update(n_fft=str(n.n_fft), win_length=str(n.win_length), hop_length=str(n.hop_length),
                    preemphasis=repr(n.preemphasis))  # fmt: skip
        meta["normalize_type"] = "per_feature" if n.normalize == "per_feature" else ""
    elif features.kaldi is not None:
        k = features.kaldi
        meta.update(window_type=k.window_type, remove_dc_offset=str(int(k.remove_dc_offset)),
                    snip_edges=str(int(k.snip_edges)), preemph_coeff=repr(k.preemph_coeff),
                    low_freq=repr(k.low_freq), high_freq=repr(k.high_freq))  # fmt: skip
        meta["normalize_type"] = "per_feature" if features.normalize == "per_feature" else ""
    return meta


def export_ctc_onnx(
    model: ParakeetForCTC,
    features: FeatureRecipe,
    vocab: CTCVocab,
    out: str | Path,
    *,
    signature: str = "nemo",
    opset: int = OPSET,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write `out` (fp32 ONNX) from a float32 `model`; -> out."""
    import onnx

    out = Path(out)
    cfg = model.config
    if signature == "nemo":
        wrapper: nn.Module = _NemoSignature(model)
        names, outputs = ["audio_signal", "length"], ["logprobs", "encoded_lengths"]
        feat_axes = {0: "N", 2: "T"}
    elif signature == "sherpa":
        wrapper = _SherpaSignature(model)
        names, outputs = ["x", "x_lens"], ["log_probs", "log_probs_len"]
        feat_axes = {0: "N", 1: "T"}
    else:
        raise ValueError(f"signature {signature!r}: 'nemo' or 'sherpa'")
    model = model.float().eval()
    # two clips of different lengths, so the traced graph is the padded, masked one
    t = 8 * cfg.subsampling_factor
    feats = torch.randn(2, t, cfg.num_mel_bins)
    if signature == "nemo":
        feats = feats.transpose(1, 2).contiguous()
    lengths = torch.tensor([t, t // 2], dtype=torch.int64)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and trace warnings
        torch.onnx.export(
            wrapper, (feats, lengths), str(out), dynamo=False, opset_version=opset, input_names=names,
            output_names=outputs, dynamic_axes={names[0]: feat_axes, names[1]: {0: "N"},
                                                outputs[0]: {0: "N", 1: "T_out"}, outputs[1]: {0: "N"}},
        )  # fmt: skip
    proto = onnx.load(str(out))
    meta = {
        "model_type": "EncDecCTCModelBPE",
        "vocab_size": str(cfg.vocab_size),
        "subsampling_factor": str(cfg.subsampling_factor),
        "blank_id": str(model.blank_id),
        "parameters": str(sum(p.numel() for p in model.parameters())),
        "vocab": vocab.to_json(),
        "producer": "autoglm",
        "quantization": "float32",
        **feature_metadata(features),
        **(extra_metadata or {}),
    }
    set_metadata(proto, meta)
    onnx.save(proto, str(out))
    return out


def set_metadata(proto: object, meta: dict[str, str]) -> None:
    """Replace/add string metadata_props on an onnx.ModelProto."""
    props = proto.metadata_props  # type: ignore[attr-defined]
    existing = {p.key: p for p in props}
    for k, v in meta.items():
        if k in existing:
            existing[k].value = v
        else:
            e = props.add()
            e.key, e.value = k, v


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """INT8 dynamic quantization of `src` into `dst` (metadata kept); -> dst."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ModelLoadError(f"{src}: no such ONNX file to quantize")
    quantize_dynamic(
        src, dst, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True, weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True},  # activation x activation MatMuls (attention) stay float
    )  # fmt: skip
    proto = onnx.load(str(dst))
    meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    set_metadata(proto, {**meta, "quantization": "int8"})
    onnx.save(proto, str(dst))
    return dst


def export_speech_dir(src: str | Path, out: str | Path, *, signature: str = "nemo") -> dict[str, int]:
    """HF Parakeet-CTC directory -> `OUT.onnx` (fp32) + `OUT.int8.onnx`; -> {path: bytes}. A trailing `.onnx` on
    `out` is dropped first, so `model.onnx` gives model.onnx and model.int8.onnx."""
    from autoglm.speech.conformer import load_parakeet_hf

    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".onnx" else out
    fp32, int8 = stem.with_name(stem.name + ".onnx"), stem.with_name(stem.name + ".int8.onnx")
    model, features, vocab, _ = load_parakeet_hf(src, dtype=torch.float32)
    export_ctc_onnx(model, features, vocab, fp32, signature=signature, extra_metadata={"source": json.dumps(str(src))})
    quantize_int8(fp32, int8)
    return {str(fp32): fp32.stat().st_size, str(int8): int8.stat().st_size}
