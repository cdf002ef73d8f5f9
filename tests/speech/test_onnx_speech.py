"""ONNX CTC speech modules: our export (fp32) run by onnxruntime vs the PyTorch path, its INT8 dynamic
quantization (argmax agreement bound), both input signatures, metadata, sherpa-onnx style files (tokens.txt,
Kaldi fbank), `autoglm quantize` on a speech directory, and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from autoglm.cli import main
from autoglm.errors import ConfigError, CorruptFile, ModelLoadError
from autoglm.loader.onnx import OnnxCTCModel, _scan, looks_like_onnx
from autoglm.speech.conformer import conformer_kind, load_conformer, load_parakeet_hf
from tests.fixtures.conformer import tone_clip

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
onnx = pytest.importorskip("onnx", reason="onnx (export / quantization) is not installed")

CLIPS = [tone_clip(s, seed=20 + i) for i, s in enumerate((3.0, 1.1, 2.2, 4.5))]
INT8_MIN_AGREEMENT = 0.95  # measured 0.97-1.0 on the tiny configs; INT8 weights + dynamic uint8 activations


@pytest.fixture(scope="module")
def exported(parakeet_dirs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """signature -> (HF dir, fp32 .onnx); nemo from config 0, sherpa from config 1. Plus "int8" from config 0."""
    from autoglm.quant.speech_onnx import export_ctc_onnx, export_speech_dir

    root = tmp_path_factory.mktemp("onnx")
    files = export_speech_dir(parakeet_dirs[0], root / "nemo.onnx")
    model, features, vocab, _ = load_parakeet_hf(parakeet_dirs[1])
    sherpa = export_ctc_onnx(model, features, vocab, root / "sherpa.onnx", signature="sherpa")
    assert sorted(Path(f).name for f in files) == ["nemo.int8.onnx", "nemo.onnx"]
    return {
        "nemo": (parakeet_dirs[0], root / "nemo.onnx"),
        "int8": (parakeet_dirs[0], root / "nemo.int8.onnx"),
        "sherpa": (parakeet_dirs[1], sherpa),
    }


def _torch_log_probs(hf_dir: Path) -> tuple[list[np.ndarray], torch.Tensor, torch.Tensor]:
    model, features, _, _ = load_parakeet_hf(hf_dir)
    feats, frames = features(CLIPS)
    with torch.no_grad():
        logp, lens = model.log_probs(feats, frames)
    return [logp[b, :n].numpy() for b, n in enumerate(lens.tolist())], feats, frames


@pytest.mark.parametrize("signature", ["nemo", "sherpa"])
def test_fp32_onnx_matches_pytorch(exported: dict[str, tuple[Path, Path]], signature: str) -> None:
    hf_dir, path = exported[signature]
    ref, feats, frames = _torch_log_probs(hf_dir)
    m = OnnxCTCModel(path, threads=2)
    assert m.info.signature == signature and m.quantization == "float32"
    cfg = load_parakeet_hf(hf_dir)[0].config
    assert (m.vocab_size, m.subsampling_factor) == (cfg.vocab_size, cfg.subsampling_factor)
    assert m.metadata["normalize_type"] == "per_feature" and m.features.kind == "nemo_mel"
    assert m.features.num_bins == cfg.num_mel_bins
    logp, lens = m.log_probs(feats, frames)
    for b, r in enumerate(ref):
        assert int(lens[b]) == r.shape[0]
        err = np.abs(logp[b, : r.shape[0]] - r).max() / np.abs(r).max()
        assert err <= 1e-5, f"clip {b}: relative error {err:.2e}"
    rec_onnx, info = load_conformer(path, threads=2)
    rec_torch, _ = load_conformer(hf_dir)
    assert info.format == "onnx" and info.quantization == "float32" and info.parameters > 0
    assert [t.text for t in rec_onnx.transcribe_batch(CLIPS)] == [t.text for t in rec_torch.transcribe_batch(CLIPS)]


def test_int8_onnx_argmax_agreement(exported: dict[str, tuple[Path, Path]]) -> None:
    hf_dir, path = exported["int8"]
    ref, feats, frames = _torch_log_probs(hf_dir)
    m = OnnxCTCModel(path, threads=2)
    assert m.quantization == "int8" and m.metadata["quantization"] == "int8"
    assert _scan(path)[0] == "int8" and _scan(exported["nemo"][1])[0] == "float32"  # the graph says so too
    assert path.stat().st_size < exported["nemo"][1].stat().st_size
    logp, lens = m.log_probs(feats, frames)
    same = total = 0
    for b, r in enumerate(ref):
        same += int((logp[b, : r.shape[0]].argmax(-1) == r.argmax(-1)).sum())
        total += r.shape[0]
    agreement = same / total
    print(f"INT8 vs PyTorch fp32 argmax agreement: {agreement:.3f} over {total} frames")
    assert agreement >= INT8_MIN_AGREEMENT


def test_sherpa_style_file_with_tokens_txt_and_kaldi_fbank(exported: dict, tmp_path: Path) -> None:
    _, src = exported["sherpa"]
    proto = onnx.load(str(src))
    vocab = json.loads(next(p.value for p in proto.metadata_props if p.key == "vocab"))
    keep = {"vocab_size", "subsampling_factor", "normalize_type"}  # what sherpa-onnx NeMo CTC exports carry
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key in keep]
    del proto.metadata_props[:]
    for k, v in kept:
        proto.metadata_props.add(key=k, value=v)
    d = tmp_path / "sherpa"
    d.mkdir()
    onnx.save(proto, str(d / "model.onnx"))
    (d / "tokens.txt").write_text("".join(f"{t} {i}\n" for i, t in enumerate(vocab)), encoding="utf-8")
    rec, info = load_conformer(d / "model.onnx")
    assert info.quantization == "float32" and info.parameters > 0  # scanned from the graph (no metadata)
    assert rec.features.kind == "kaldi_fbank" and rec.features.normalize == "per_feature"
    assert rec.features.num_bins == 64  # from the input's static dim (config 1 has 64 mel bins)
    assert rec.blank_id == len(vocab) - 1  # no blank_id / <blk>: NeMo's last id
    assert isinstance(rec.transcribe(CLIPS[0]).text, str)


def test_autoglm_quantize_speech_dir(parakeet_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["quantize", str(parakeet_dir), str(tmp_path / "speech"), "int8"]) == 0
    out = capsys.readouterr().out
    assert "speech.onnx" in out and "speech.int8.onnx" in out
    assert conformer_kind(tmp_path / "speech.int8.onnx") == "onnx"
    _, info = load_conformer(tmp_path / "speech.int8.onnx")
    assert info.quantization == "int8"
    assert main(["quantize", str(parakeet_dir), str(tmp_path / "x"), "int4"]) == 1
    assert "TYPE must be int8" in capsys.readouterr().err


def test_bad_files_give_clear_errors(exported: dict, tmp_path: Path) -> None:
    _, good = exported["nemo"]
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    assert not looks_like_onnx(text) and looks_like_onnx(good)
    with pytest.raises(CorruptFile, match="notes.onnx: not an ONNX model"):
        OnnxCTCModel(text)
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorruptFile, match="cut.onnx: onnxruntime cannot load it"):
        OnnxCTCModel(truncated)
    with pytest.raises(CorruptFile, match="no such file"):
        OnnxCTCModel(tmp_path / "absent.onnx")

    proto = onnx.load(str(good))
    for p in list(proto.metadata_props):
        if p.key == "subsampling_factor":
            proto.metadata_props.remove(p)
    onnx.save(proto, str(tmp_path / "nometa.onnx"))
    with pytest.raises(ConfigError, match=r"nometa.onnx: ONNX metadata_props lack subsampling_factor"):
        OnnxCTCModel(tmp_path / "nometa.onnx")

    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["foo"], ["bar"])], "g",
        [helper.make_tensor_value_info("foo", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("bar", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    other = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(other, str(tmp_path / "identity.onnx"))
    with pytest.raises(ModelLoadError, match=r"identity.onnx: ONNX inputs \['foo'\].*audio_signal, length"):
        OnnxCTCModel(tmp_path / "identity.onnx")
