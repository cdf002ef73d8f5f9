"""`load_speech_model`: decide what a speech-module path is by its contents and load its recognizer.

- a directory with model.bin (CTranslate2 binary) + config.json, spec WhisperSpec   -> Whisper from CTranslate2
- a directory whose config.json names WhisperForConditionalGeneration / model_type whisper -> Whisper from safetensors
- an ONNX file, or an HF dir of a Parakeet/FastConformer CTC model                   -> `load_conformer`
  (autoglm.speech.conformer: onnxruntime or our PyTorch FastConformer)
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autoglm.errors import ConfigError, ModelLoadError, UnsupportedArchitecture
from autoglm.models.loaded import ModuleInfo
from autoglm.speech.recognizer import SpeechRecognizer

log = logging.getLogger("autoglm.speech")


@dataclass
class LoadedSpeechModel:
    recognizer: SpeechRecognizer
    info: ModuleInfo  # the start-up log line: path, format, quantization, device, parameters, bytes, seconds


def load_speech_model(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedSpeechModel:
    """Load the speech module at `path` (see the module docstring for what is recognised).

    Whisper weights are kept in `dtype` (float16/int8 CTranslate2 weights are converted at load: on CPU float32
    matmuls are faster than dequantizing per call). Raises ModelLoadError subclasses naming the file and cause.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"speech model {p} does not exist")
    t0 = time.perf_counter()
    if p.is_dir():
        from autoglm.loader.ct2 import is_ct2_dir

        if is_ct2_dir(p):
            loaded = _whisper_ct2(p, torch.device(device), dtype)
        else:
            config = _hf_config(p)
            arch = _architecture(config)
            if arch == "whisper":
                loaded = _whisper_hf(p, config, torch.device(device), dtype)
            elif arch == "parakeet":
                loaded = _conformer(p)
            else:
                raise UnsupportedArchitecture(
                    f"{p}/config.json: {arch!r} is not a speech model we load (supported: Whisper as HF safetensors "
                    "or CTranslate2 model.bin, Parakeet/FastConformer CTC as HF safetensors or ONNX)"
                )
    elif _is_onnx(p):
        loaded = _conformer(p)
    else:
        raise UnsupportedArchitecture(
            f"{p}: not a speech model (expected a CTranslate2 or HF Whisper directory, or an ONNX file)"
        )
    loaded.info.load_seconds = time.perf_counter() - t0
    return loaded


def _hf_config(root: Path) -> dict[str, Any]:
    f = root / "config.json"
    if not f.is_file():
        raise ModelLoadError(f"{root}: no config.json and no CTranslate2 model.bin; not a speech model directory")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{f}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{f}: expected a JSON object")
    return data


def _architecture(config: dict[str, Any]) -> str:
    archs = [str(a) for a in config.get("architectures") or []]
    model_type = str(config.get("model_type", ""))
    if "WhisperForConditionalGeneration" in archs or model_type == "whisper":
        return "whisper"
    if any(a.startswith("Parakeet") for a in archs) or model_type.startswith("parakeet"):
        return "parakeet"
    return archs[0] if archs else model_type or "unknown"


def _is_onnx(path: Path) -> bool:
    """An ONNX ModelProto starts with field 1 (ir_version, varint): byte 0x08. Checked by content, not name."""
    try:
        with path.open("rb") as fh:
            head = fh.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x08 and head[1] < 0x80


def _conformer(path: Path) -> LoadedSpeechModel:
    from autoglm.speech.conformer import load_conformer

    recognizer, info = load_conformer(path)
    return LoadedSpeechModel(recognizer, info)


def _module_info(model: torch.nn.Module, path: Path, fmt: str, quantization: str, device: torch.device,
                 file_bytes: int) -> ModuleInfo:
    params = {id(p): p for p in model.parameters()}.values()
    by_type: dict[str, int] = {}
    for t in params:
        k = str(t.dtype).removeprefix("torch.")
        by_type[k] = by_type.get(k, 0) + t.numel() * t.element_size()
    return ModuleInfo(name="speech", path=str(path), format=fmt, quantization=quantization, device=str(device),
                      parameters=sum(t.numel() for t in params), bytes=file_bytes, load_seconds=0.0,
                      bytes_by_type=by_type)


def _whisper_ct2(root: Path, device: torch.device, dtype: torch.dtype) -> LoadedSpeechModel:
    from autoglm.loader.ct2 import read_ct2_dir
    from autoglm.loader.weights import fill_parameters
    from autoglm.models.whisper import WhisperForConditionalGeneration, config_from_ct2, ct2_tensors
    from autoglm.speech.whisper_recognizer import WhisperRecognizer
    from autoglm.speech.whisper_tokenizer import WhisperTokenizer

    d = read_ct2_dir(root)
    cfg = config_from_ct2(d.model)
    if d.tokenizer_json is None:
        raise ModelLoadError(f"{root}: no tokenizer.json (a CTranslate2 Whisper directory needs it)")
    tok = WhisperTokenizer.from_file(d.tokenizer_json, multilingual=cfg.multilingual)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(cfg)
    fill_parameters(model, ct2_tensors(d.model, dtype), source=str(d.model.path), dtype=dtype, device=device)
    model.eval()
    suppress = _ids(d.config.get("suppress_ids")) or tok.non_speech_tokens()
    begin = _ids(d.config.get("suppress_ids_begin")) or [tok.encode(" ")[0], tok.eot]
    quant = d.model.quantization()
    rec = WhisperRecognizer(model, tok, sorted(set(suppress) | set(tok.always_suppressed())), begin,
                            name=f"whisper-{root.name}", format="ct2", quantization=quant)
    info = _module_info(model, root, "ct2", quant, device, d.model.path.stat().st_size)
    return LoadedSpeechModel(rec, info)


def _whisper_hf(root: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> LoadedSpeechModel:
    from autoglm.loader.hf import iter_safetensors, read_generation_config, safetensors_files
    from autoglm.loader.weights import fill_parameters
    from autoglm.models.whisper import WhisperConfig, WhisperForConditionalGeneration
    from autoglm.speech.whisper_recognizer import WhisperRecognizer
    from autoglm.speech.whisper_tokenizer import WhisperTokenizer

    cfg = WhisperConfig.from_hf(config)
    tok_file = root / "tokenizer.json"
    if not tok_file.is_file():
        raise ModelLoadError(f"{root}: no tokenizer.json (a Whisper directory needs it)")
    tok = WhisperTokenizer.from_file(tok_file, multilingual=cfg.multilingual)
    files = safetensors_files(root)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(cfg)
    fill_parameters(model, iter_safetensors(files, dtype), source=str(root), dtype=dtype, device=device)
    model.eval()
    gen = read_generation_config(root)
    suppress = _ids(gen.get("suppress_tokens", config.get("suppress_tokens"))) or tok.non_speech_tokens()
    begin = _ids(gen.get("begin_suppress_tokens", config.get("begin_suppress_tokens"))) or [tok.encode(" ")[0],
                                                                                           tok.eot]
    quant = str(dtype).removeprefix("torch.")
    rec = WhisperRecognizer(model, tok, sorted(set(suppress) | set(tok.always_suppressed())), begin,
                            name=f"whisper-{root.name}", format="safetensors", quantization=quant)
    info = _module_info(model, root, "safetensors", quant, device, sum(f.stat().st_size for f in files))
    return LoadedSpeechModel(rec, info)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value] if value >= 0 else []
    return [int(v) for v in value if int(v) >= 0]
