"""GGUF input for the HF-checkpoint tools: `export_hf` writes a directory that computes what the GGUF computes (ours and
transformers'), and `autoglm prune FILE.gguf` writes a pruned checkpoint that `autoglm.LLM` loads and that equals the
dequantized original with the removed channels zeroed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autoglm.errors import UnsupportedArchitecture
from autoglm.gguf.export import export_hf, is_gguf_file
from autoglm.loader.gguf import load_gguf
from autoglm.loader.hf import load_hf
from autoglm.tools.prune import _forward_logits, prune_checkpoint


@pytest.fixture(autouse=True)
def _reference_matmuls(monkeypatch: pytest.MonkeyPatch) -> None:
    """GGUF models here run the exact dequantize-then-matmul path (the fused kernels round activations to int8)."""
    monkeypatch.setenv("AUTOGLM_GGUF_KERNELS", "0")  # read by the loader's one kernel selection per model


TEXT = "hello world the wor he ll 中文 the hello\nthe world " * 6


def _hf_logits(path: Path, ids: torch.Tensor, keep: dict[int, list[int]] | None = None) -> torch.Tensor:
    """transformers' logits for the HF directory `path`; with `keep`, MLP channels outside it are zeroed first."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if keep is not None:
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                drop = torch.ones(layer.mlp.down_proj.weight.shape[1], dtype=torch.bool)
                drop[keep[i]] = False
                layer.mlp.down_proj.weight[:, drop] = 0.0
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


@pytest.fixture(scope="module")
def exported_gemma3(tmp_path_factory: pytest.TempPathFactory, tiny_gemma3_gguf_q8: Path) -> Path:
    return export_hf(tiny_gemma3_gguf_q8, tmp_path_factory.mktemp("export") / "gemma3")


def test_export_computes_what_the_gguf_computes(exported_gemma3: Path, tiny_gemma3_gguf_q8: Path) -> None:
    config = json.loads((exported_gemma3 / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    ours_gguf = load_gguf(tiny_gemma3_gguf_q8)
    ours_hf = load_hf(exported_gemma3, dtype="float32")
    # tokenizer: same ids (BOS included) from the saved tokenizer.json + tokenizer_config.json
    assert ours_hf.tokenizer.encode(TEXT) == ours_gguf.tokenizer.encode(TEXT)
    assert ours_hf.tokenizer.bos_token == ours_gguf.tokenizer.bos_token
    assert ours_hf.eos_token_ids == ours_gguf.eos_token_ids
    ids = torch.tensor(ours_gguf.tokenizer.encode(TEXT)[:24])
    from_gguf = _forward_logits(ours_gguf.decoder, ids)
    from_dir = _forward_logits(ours_hf.decoder, ids)
    # the exported weights are exactly what the GGUF model multiplies by (decoded blocks, norms shifted back)
    from safetensors.torch import load_file

    exported = load_file(str(exported_gemma3 / "model.safetensors"))
    for name, mod in ours_gguf.decoder.named_modules():
        if hasattr(mod, "dequantized_weight") and name + ".weight" in exported:
            torch.testing.assert_close(exported[name + ".weight"], mod.dequantized_weight(), rtol=0, atol=0)
    for name, p in ours_gguf.decoder.named_parameters():
        if p.is_floating_point() and name in exported:
            torch.testing.assert_close(exported[name], p.float(), rtol=0, atol=0)
    torch.testing.assert_close(from_dir, from_gguf, rtol=1e-4, atol=1e-4)
    # norms came back shifted by -1: transformers (which adds 1 itself) computes the same
    torch.testing.assert_close(_hf_logits(exported_gemma3, ids), from_dir, rtol=1e-4, atol=1e-4)


def test_export_norms_undo_the_plus_one(exported_gemma3: Path, tiny_gemma3_hf_model: torch.nn.Module) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(exported_gemma3 / "model.safetensors"))
    ref = tiny_gemma3_hf_model.state_dict()
    norms = ("model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.1.self_attn.q_norm.weight")
    for name in norms:
        torch.testing.assert_close(sd[name], ref[name].float(), rtol=0, atol=1e-6)  # F32 norms: exact
    assert "lm_head.weight" not in sd  # tied, as in the GGUF


def test_prune_cli_on_gguf_loads_in_llm(tiny_gemma3_gguf_q8: Path, exported_gemma3: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import autoglm
    from autoglm.cli import main

    calib, held = tmp_path / "calib.txt", tmp_path / "held.txt"
    calib.write_text(TEXT, encoding="utf-8")
    held.write_text(TEXT[::-1], encoding="utf-8")
    out = tmp_path / "pruned"
    argv = ["prune", str(tiny_gemma3_gguf_q8), "--ratio", "0.5", "-o", str(out), "--multiple-of", "16",
            "--calibration", str(calib), "--eval", str(held), "--window", "32",
            "--json", str(tmp_path / "r.json")]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "GGUF, dequantized" in text and "perplexity on" in text
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["intermediate_before"] == 96 and report["intermediate_after"] == 48
    assert report["perplexity_after"] > 0 and report["eval_tokens"] > 0
    assert not list(tmp_path.glob(".prune-src-*"))  # the float32 export was removed
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 48

    llm = autoglm.LLM(str(out), num_kv_blocks=16)
    try:
        mlp = llm.model.decoder.model.layers[0].mlp
        assert mlp.gate_proj.weight.shape == (48, 64) and mlp.down_proj.weight.shape == (64, 48)
        result = llm.generate(TEXT[:40], max_tokens=4, temperature=0.0, ignore_eos=True)
        assert len(result.token_ids) == 4
    finally:
        llm.close()


def test_pruned_gguf_equals_masked_dequantized_original(tiny_gemma3_gguf_q8: Path, exported_gemma3: Path,
                                                        tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "pruned"
    report = prune_checkpoint(tiny_gemma3_gguf_q8, out, 0.25, calibration_text=TEXT, window=32, multiple_of=8)
    assert report.intermediate_after == 72 and "calibration" in report.criterion
    ids = torch.tensor(load_hf(out).tokenizer.encode(TEXT)[:20])
    pruned = _hf_logits(out, ids)
    torch.testing.assert_close(pruned, _hf_logits(exported_gemma3, ids, keep=report.kept), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_forward_logits(load_hf(out, dtype="float32").decoder, ids), pruned,
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_export_glm4_and_refusals(tiny_glm4_gguf: Path, tiny_glm4v_text_gguf: Path, tmp_path: Path) -> None:
    out = export_hf(tiny_glm4_gguf, tmp_path / "glm4")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Glm4ForCausalLM"]
    g = load_gguf(tiny_glm4_gguf)
    ids = torch.tensor(g.tokenizer.encode("hello world, the quick brown fox")[:16])
    ours = _forward_logits(load_hf(out, dtype="float32").decoder, ids)
    torch.testing.assert_close(ours, _forward_logits(g.decoder, ids), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_hf_logits(out, ids), ours, rtol=1e-4, atol=1e-4)

    with pytest.raises(UnsupportedArchitecture, match="M-RoPE"):
        export_hf(tiny_glm4v_text_gguf, tmp_path / "glm4v")
    not_gguf = tmp_path / "model.gguf"  # the name says GGUF, the content does not
    not_gguf.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    assert not is_gguf_file(not_gguf) and is_gguf_file(tiny_glm4_gguf)
    from autoglm.cli import main

    assert main(["prune", str(not_gguf), "--ratio", "0.25", "-o", str(tmp_path / "x")]) == 1
