"""Load a CTC speech model exported to ONNX and run it with onnxruntime (fp32 or INT8 from `quantize_dynamic`).

Two input signatures are accepted, as sherpa-onnx does:
- NeMo:   `audio_signal` [N, bins, T] float32 + `length` [N] int64 -> log-probs [N, T', vocab] (+ lengths [N])
- sherpa: `x` [N, T, bins] float32 + `x_lens` [N] int64           -> log-probs [N, T', vocab] (+ lengths [N])

What the model needs is read from the ONNX `metadata_props` (never from the file name): `vocab_size`,
`subsampling_factor`, `normalize_type` are required (the sherpa-onnx NeMo CTC keys); feature settings
(`feature_type` nemo_mel | kaldi_fbank, `feat_dim`, `sample_rate`, `n_fft`, `win_length`, `hop_length`,
`preemphasis`, `window_type`, `snip_edges`, ...) and `blank_id` / `vocab` are optional. Errors name the file and the
missing input or key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from autoglm.errors import ConfigError, CorruptFile, ModelLoadError
from autoglm.multimodal.fbank import FeatureRecipe, KaldiFbankConfig, NemoMelConfig

REQUIRED_METADATA = ("vocab_size", "subsampling_factor", "normalize_type")
SIGNATURES = {"nemo": ("audio_signal", "length"), "sherpa": ("x", "x_lens")}
# ModelProto field tags that may follow ir_version (field 1): producer_name .. metadata_props, functions
_MODEL_PROTO_TAGS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0x7A, 0x92}
_INT8_OPS = {"MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QLinearMatMul", "QLinearConv",
             "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QuantizeLinear"}  # fmt: skip


def looks_like_onnx(path: str | Path) -> bool:
    """True when `path` is a file that starts like a serialized ONNX ModelProto (ir_version varint, then a known
    ModelProto field). ONNX has no magic number; this is the cheap content test, the session then validates."""
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        head = f.read(16)
    if len(head) < 3 or head[0] != 0x08:
        return False
    i, version, shift = 1, 0, 0
    while i < len(head) and head[i] & 0x80:
        version |= (head[i] & 0x7F) << shift
        shift, i = shift + 7, i + 1
    if i >= len(head) - 1:
        return False
    version |= head[i] << shift
    return 1 <= version <= 64 and head[i + 1] in _MODEL_PROTO_TAGS


def _int(meta: dict[str, str], key: str, path: Path, default: int | None = None) -> int:
    if key not in meta:
        if default is None:
            raise ConfigError(f"{path}: ONNX metadata has no {key!r}")
        return default
    try:
        return int(meta[key])
    except ValueError:
        raise ConfigError(f"{path}: ONNX metadata {key}={meta[key]!r} is not an integer") from None


def feature_recipe(meta: dict[str, str], path: Path, feat_dim: int | None) -> FeatureRecipe:
    """Features from metadata: `feature_type` nemo_mel (our export) or kaldi_fbank (sherpa-onnx default)."""
    normalize = meta.get("normalize_type", "") or "none"
    if normalize not in ("per_feature", "none"):
        raise ConfigError(f"{path}: normalize_type={normalize!r} not supported (per_feature or empty)")
    bins = _int(meta, "feat_dim", path, feat_dim or 80)
    rate = _int(meta, "sample_rate", path, 16_000)
    kind = meta.get("feature_type", "kaldi_fbank")
    if kind == "nemo_mel":
        nemo = NemoMelConfig.from_dict({
            "sampling_rate": rate, "feature_size": bins, "normalize": normalize,
            **{k: float(meta[k]) if k == "preemphasis" else int(meta[k])
               for k in ("n_fft", "win_length", "hop_length", "preemphasis") if k in meta},
        })  # fmt: skip
        return FeatureRecipe(kind="nemo_mel", nemo=nemo)
    if kind != "kaldi_fbank":
        raise ConfigError(f"{path}: feature_type={kind!r} is not nemo_mel or kaldi_fbank")
    # Kaldi defaults unless the exporter recorded otherwise (snip_edges off, as sherpa-onnx computes fbank)
    kaldi = KaldiFbankConfig(
        sample_rate=rate,
        num_mel_bins=bins,
        window_type=meta.get("window_type", "povey"),
        remove_dc_offset=meta.get("remove_dc_offset", "1") not in ("0", "false", "False"),
        snip_edges=meta.get("snip_edges", "0") in ("1", "true", "True"),
        preemph_coeff=float(meta.get("preemph_coeff", 0.97)),
        low_freq=float(meta.get("low_freq", 20.0)),
        high_freq=float(meta.get("high_freq", 0.0)),
    )
    return FeatureRecipe(kind="kaldi_fbank", kaldi=kaldi, normalize=normalize)


@dataclass
class OnnxInfo:
    path: Path
    signature: str  # "nemo" | "sherpa"
    metadata: dict[str, str]
    quantization: str  # "int8" | "float32"
    bytes: int
    parameters: int


class OnnxCTCModel:
    """A `CTCAcousticModel` backed by an onnxruntime session (CPU provider, `threads` intra-op threads)."""

    format = "onnx"

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        p = Path(path)
        if not p.is_file():
            raise CorruptFile(f"{p}: no such file")
        if not looks_like_onnx(p):
            raise CorruptFile(f"{p}: not an ONNX model (no serialized ModelProto)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or 0  # 0: onnxruntime picks (one per physical core)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own (Fail, InvalidProtobuf, ...) without a common base
            raise CorruptFile(f"{p}: onnxruntime cannot load it ({type(e).__name__}: {e})") from e
        inputs = {i.name: i for i in self.session.get_inputs()}
        sig = next((k for k, names in SIGNATURES.items() if all(n in inputs for n in names)), None)
        if sig is None:
            want = " or ".join(f"({', '.join(n)})" for n in SIGNATURES.values())
            raise ModelLoadError(f"{p}: ONNX inputs {sorted(inputs)}; a CTC speech model needs {want}")
        outputs = [o.name for o in self.session.get_outputs()]
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        if missing:
            raise ConfigError(f"{p}: ONNX metadata_props lack {', '.join(missing)} (found: {sorted(meta) or 'none'})")
        self.feature_input, self.length_input = SIGNATURES[sig]
        self.output_names = outputs[:2]
        shape = inputs[self.feature_input].shape
        static_bins = shape[1 if sig == "nemo" else 2] if len(shape) == 3 else None
        self.vocab_size = _int(meta, "vocab_size", p)
        self.subsampling_factor = _int(meta, "subsampling_factor", p)
        self.features = feature_recipe(meta, p, static_bins if isinstance(static_bins, int) else None)
        if isinstance(static_bins, int) and static_bins != self.features.num_bins:
            raise ConfigError(f"{p}: input {self.feature_input} has {static_bins} bins, metadata says "
                              f"{self.features.num_bins}")  # fmt: skip
        # our exports record both; otherwise the graph is scanned (loads the protobuf once more, briefly)
        if meta.get("quantization") in ("int8", "float32") and meta.get("parameters", "").isdigit():
            quant, params = meta["quantization"], int(meta["parameters"])
        else:
            quant, params = _scan(p)
        self.info = OnnxInfo(p, sig, meta, quant, p.stat().st_size, params)
        self.name, self.quantization, self.metadata = p.name, quant, meta

    def output_lengths(self, lengths: np.ndarray) -> np.ndarray:
        """NeMo striding-conv arithmetic (kernel 3, padding 1, stride 2) once per factor of 2."""
        for _ in range(int(np.log2(self.subsampling_factor))):
            lengths = (lengths - 1) // 2 + 1
        return lengths

    def log_probs(self, features: Tensor, lengths: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """features [B, T, bins], lengths [B] -> (log-probs [B, T', vocab], lengths [B]) per `CTCAcousticModel`."""
        x = features.float().numpy()
        if self.feature_input == "audio_signal":
            x = np.ascontiguousarray(x.transpose(0, 2, 1))  # NeMo layout [B, bins, T]
        n = lengths.numpy().astype(np.int64)
        out: list[Any] = self.session.run(self.output_names, {self.feature_input: x, self.length_input: n})
        logp = np.asarray(out[0], dtype=np.float32)
        out_len = np.asarray(out[1], dtype=np.int64) if len(out) > 1 else self.output_lengths(n)
        return logp, np.minimum(out_len, logp.shape[1])


def _scan(path: Path) -> tuple[str, int]:
    """("int8" | "float32", number of initializer elements) from the graph (external data not loaded)."""
    try:
        import onnx
    except ImportError:  # the runtime alone can still run the model; the label is then unknown
        return "unknown", 0
    model = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    return ("int8" if ops & _INT8_OPS else "float32"), params
