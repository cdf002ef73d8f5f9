"""Load a CTC Conformer speech module: an HF Parakeet-CTC directory (PyTorch) or a CTC model in ONNX (onnxruntime).

`conformer_kind(path)` tells what a path is by its content (config.json architectures, ONNX protobuf), never its
name; `load_conformer(path)` returns a `CTCRecognizer` plus the `ModuleInfo` for the start-up log line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from autoglm.errors import ConfigError, ModelLoadError
from autoglm.loader.hf import iter_safetensors, safetensors_files
from autoglm.loader.onnx import OnnxCTCModel, looks_like_onnx
from autoglm.loader.weights import fill_parameters
from autoglm.models.config import read_config_json
from autoglm.models.loaded import ModuleInfo
from autoglm.models.parakeet import ARCHITECTURES, ParakeetConfig, ParakeetForCTC
from autoglm.multimodal.fbank import FeatureRecipe, NemoMelConfig
from autoglm.speech.ctc import CTCRecognizer, CTCVocab

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def conformer_kind(path: str | Path) -> str | None:
    """ "hf" (a directory whose config.json names a CTC Parakeet), "onnx" (an ONNX file), or None."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        try:
            archs = json.loads((p / "config.json").read_text(encoding="utf-8")).get("architectures") or []
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
        return "hf" if any(a in ARCHITECTURES for a in archs) else None
    return "onnx" if looks_like_onnx(p) else None


class TorchCTCModel:
    """`CTCAcousticModel` over our PyTorch `ParakeetForCTC` (fp32 or bf16 weights, log-probs in fp32)."""

    format = "safetensors"

    def __init__(self, model: ParakeetForCTC, *, name: str, device: torch.device | str = "cpu") -> None:
        self.model = model.eval()
        self.name = name
        self.device = torch.device(device)
        self.quantization = str(model.ctc_head.weight.dtype).removeprefix("torch.")
        self.subsampling_factor = model.config.subsampling_factor

    def log_probs(self, features: Tensor, lengths: Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            logp, out_len = self.model.log_probs(features.to(self.device), lengths.to(self.device))
        return logp.cpu().numpy(), out_len.cpu().numpy()


def load_parakeet_hf(
    root: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[ParakeetForCTC, FeatureRecipe, CTCVocab, float]:
    """An HF Parakeet-CTC directory -> (model built on meta and filled, features, vocabulary, seconds)."""
    t0 = time.perf_counter()
    root = Path(root)
    cfg = ParakeetConfig.from_dict(read_config_json(root), source=str(root / "config.json"))
    pre = root / "preprocessor_config.json"
    try:
        pre_dict = json.loads(pre.read_text(encoding="utf-8")) if pre.is_file() else {"feature_size": cfg.num_mel_bins}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{pre}: invalid JSON: {e}") from e
    nemo = NemoMelConfig.from_dict(pre_dict)
    if nemo.n_mels != cfg.num_mel_bins:
        raise ConfigError(f"{pre}: feature_size {nemo.n_mels} != encoder num_mel_bins {cfg.num_mel_bins}")
    if not (root / "tokenizer.json").is_file():
        raise ModelLoadError(f"{root}: no tokenizer.json (a CTC model needs its vocabulary to produce text)")
    vocab = CTCVocab.from_tokenizer_json(root / "tokenizer.json")
    if vocab.size > cfg.vocab_size:
        raise ConfigError(f"{root}: tokenizer has {vocab.size} tokens, the CTC head {cfg.vocab_size}")
    with torch.device("meta"):
        model = ParakeetForCTC(cfg)
    fill_parameters(
        model, iter_safetensors(safetensors_files(root), dtype), source=str(root), dtype=dtype, device=device,
        drop=lambda n: n.endswith("num_batches_tracked"),  # BatchNorm training counter
    )  # fmt: skip
    return model.eval(), FeatureRecipe(kind="nemo_mel", nemo=nemo), vocab, time.perf_counter() - t0


def _onnx_vocab(model: OnnxCTCModel) -> CTCVocab:
    meta, path = model.metadata, model.info.path
    if "vocab" in meta:
        try:
            pieces = json.loads(meta["vocab"])
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: ONNX metadata 'vocab' is not a JSON list ({e})") from e
        vocab = CTCVocab.from_pieces([str(p) for p in pieces])
    elif (path.parent / "tokens.txt").is_file():  # sherpa-onnx ships the vocabulary beside the model
        vocab = CTCVocab.from_tokens_txt(path.parent / "tokens.txt")
    else:
        raise ModelLoadError(f"{path}: no vocabulary (neither ONNX metadata 'vocab' nor tokens.txt beside it)")
    if vocab.size != model.vocab_size:
        raise ConfigError(f"{path}: vocabulary has {vocab.size} tokens, metadata vocab_size is {model.vocab_size}")
    return vocab


def load_conformer(
    path: str | Path,
    *,
    threads: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    window_seconds: float = 15.0,
    max_batch: int = 8,
) -> tuple[CTCRecognizer, ModuleInfo]:
    """A CTC Conformer speech module from an HF Parakeet-CTC directory or an ONNX file (by content).

    threads: onnxruntime intra-op threads (ONNX; PyTorch uses the process's torch threads). dtype: PyTorch weights.
    """
    t0 = time.perf_counter()
    p = Path(path)
    kind = conformer_kind(p)
    if kind == "hf":
        if dtype not in _DTYPES:
            raise ConfigError(f"speech dtype {dtype!r}: one of {', '.join(_DTYPES)}")
        model, features, vocab, _ = load_parakeet_hf(p, dtype=_DTYPES[dtype], device=device)
        backend = TorchCTCModel(model, name=p.name, device=device)
        blank = model.blank_id
        params = list(model.parameters())
        n_params, n_bytes = sum(t.numel() for t in params), sum(t.numel() * t.element_size() for t in params)
        fmt, dev = "safetensors", str(device)
        rec = CTCRecognizer(backend, features, vocab, blank_id=blank, window_seconds=window_seconds,
                            max_batch=max_batch)  # fmt: skip
    elif kind == "onnx":
        onnx_model = OnnxCTCModel(p, threads=threads)
        vocab = _onnx_vocab(onnx_model)
        meta = onnx_model.metadata
        blank_meta = meta.get("blank_id")
        blank = int(blank_meta) if blank_meta is not None else vocab.find("<blk>", "<blank>")
        blank = onnx_model.vocab_size - 1 if blank is None else blank  # NeMo's CTC blank is the last id
        rec = CTCRecognizer(onnx_model, onnx_model.features, vocab, blank_id=blank, window_seconds=window_seconds,
                            max_batch=max_batch, language=meta.get("language"))  # fmt: skip
        n_params, n_bytes, fmt, dev = onnx_model.info.parameters, onnx_model.info.bytes, "onnx", "cpu"
    else:
        raise ModelLoadError(f"{p}: neither an HF Parakeet-CTC directory (config.json architectures "
                             f"{list(ARCHITECTURES)}) nor an ONNX model file")  # fmt: skip
    info = ModuleInfo(
        name="speech", path=str(p), format=fmt, quantization=rec.quantization, device=dev,
        parameters=n_params, bytes=n_bytes, load_seconds=time.perf_counter() - t0,
    )  # fmt: skip
    return rec, info
