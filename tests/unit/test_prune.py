"""Channel pruning: the pruned checkpoint loads (in transformers and in ours) and computes exactly what the original
computes with the removed channels zeroed; kept channels are the top-scored ones; perplexity is reported."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from autoglm.tools.prune import channel_importance, kept_size, perplexity, prune_checkpoint


@pytest.fixture(scope="module")
def tiny_gemma3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from tests.fixtures.models import _vocab_size, _write_tokenizer

    path = tmp_path_factory.mktemp("gemma3_prune")
    vocab = _vocab_size(path, _write_tokenizer(path))  # our loader wants a tokenizer.json beside the weights
    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in name else 0.2))
    model.save_pretrained(path)
    return path


def _hf_logits(path: Path, ids: torch.Tensor, mask: dict[int, list[int]] | None = None) -> torch.Tensor:
    """transformers' logits for the checkpoint at `path`; with `mask`, MLP channels outside it are zeroed first."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if mask is not None:
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                mlp = layer.mlp
                inter = mlp.down_proj.weight.shape[1]
                drop = torch.ones(inter, dtype=torch.bool)
                drop[mask[i]] = False
                mlp.down_proj.weight[:, drop] = 0.0  # zeroing down_proj's column removes the channel exactly
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


def _ids(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch", ["glm4", "gemma3"])
def test_pruned_checkpoint_equals_masked_original(
    arch: str, tiny_glm4_dir: Path, tiny_gemma3_dir: Path, tmp_path: Path
) -> None:
    from autoglm.loader.hf import load_hf
    from autoglm.tools.prune import _forward_logits

    src = tiny_glm4_dir if arch == "glm4" else tiny_gemma3_dir
    config = json.loads((src / "config.json").read_text())
    inter, vocab = config["intermediate_size"], config["vocab_size"]
    out = tmp_path / "pruned"
    calib, held_out = _ids(vocab, 64, 1), _ids(vocab, 64, 2)
    report = prune_checkpoint(src, out, 0.5, calibration_text=calib, eval_text=held_out, window=32, multiple_of=16)
    keep = kept_size(inter, 0.5, 16)
    assert report.intermediate_after == keep < inter
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == keep
    assert "calibration" in report.criterion
    assert report.parameters_after < report.parameters_before
    assert report.perplexity_before is not None and report.perplexity_after is not None
    assert math.isfinite(report.perplexity_after) and report.eval_tokens == 62
    print(report.render())

    ids = torch.tensor(_ids(vocab, 20, 3))
    pruned_hf = _hf_logits(out, ids)  # transformers loads what we wrote
    masked = _hf_logits(src, ids, mask=report.kept)
    torch.testing.assert_close(pruned_hf, masked, rtol=1e-4, atol=1e-4)
    # our loader loads it too, and our pruned model equals our original with the channels zeroed
    ours = _forward_logits(load_hf(out, dtype="float32").decoder, ids)
    original = load_hf(src, dtype="float32").decoder
    with torch.no_grad():
        for name, mod in original.named_modules():
            if name.endswith("mlp") and hasattr(mod, "down_proj"):
                drop = torch.ones(inter, dtype=torch.bool)
                drop[report.kept[int(name.split(".")[-2])]] = False
                mod.down_proj.weight[:, drop] = 0.0
    torch.testing.assert_close(ours, _forward_logits(original, ids), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, pruned_hf, rtol=1e-4, atol=1e-4)


def test_kept_channels_are_top_scored(tiny_glm4_dir: Path, tmp_path: Path) -> None:
    from autoglm.loader.hf import load_hf

    config = json.loads((tiny_glm4_dir / "config.json").read_text())
    inter, vocab = config["intermediate_size"], config["vocab_size"]
    calib = _ids(vocab, 48, 4)
    model = load_hf(tiny_glm4_dir, dtype="float32").decoder
    scores = channel_importance(model, [torch.tensor(calib)], inter)
    report = prune_checkpoint(tiny_glm4_dir, tmp_path / "p", 0.25, calibration_text=calib, window=48, multiple_of=1)
    for layer, kept in report.kept.items():
        s = scores[layer]
        dropped = sorted(set(range(inter)) - set(kept))
        assert s[kept].min() >= s[dropped].max()
    # data-free criterion (no calibration): weight norms
    free = channel_importance(model, None, inter)
    mlp = model.model.layers[0].mlp
    w = mlp.gate_up_proj.weight
    expect = mlp.down_proj.weight.norm(dim=0) * w[:inter].norm(dim=1) * w[inter:].norm(dim=1)
    torch.testing.assert_close(free[0], expect)


def test_ratio_zero_is_identity_and_perplexity_matches_manual(tiny_glm4_dir: Path, tmp_path: Path) -> None:
    from autoglm.loader.hf import load_hf

    vocab = json.loads((tiny_glm4_dir / "config.json").read_text())["vocab_size"]
    held = _ids(vocab, 40, 5)
    report = prune_checkpoint(tiny_glm4_dir, tmp_path / "same", 0.0, eval_text=held, window=40)
    assert report.perplexity_before == pytest.approx(report.perplexity_after, rel=1e-6)
    from autoglm.tools.prune import _forward_logits

    model = load_hf(tiny_glm4_dir, dtype="float32").decoder
    ids = torch.tensor(held)
    logp = torch.log_softmax(_forward_logits(model, ids)[:-1], dim=-1)
    manual = math.exp(-logp[torch.arange(39), ids[1:]].mean().item())
    assert perplexity(model, [ids])[0] == pytest.approx(manual, rel=1e-5)


def test_kept_size_rounding() -> None:
    assert kept_size(13696, 0.25, 32) == 10272  # 0.75 * 13696 = 10272 = 321 * 32
    assert kept_size(100, 0.5, 32) == 50  # 100 is not a multiple of 32: no rounding
    assert kept_size(128, 0.99, 32) == 32  # never below one multiple
    from autoglm.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="ratio"):
        kept_size(128, 1.0, 32)


def test_prune_cli(tiny_glm4_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from autoglm.cli import main

    out = tmp_path / "cli"
    rc = main(["prune", str(tiny_glm4_dir), "--ratio", "0.25", "-o", str(out), "--json", str(tmp_path / "r.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "intermediate_size" in text and "wrote" in text
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["intermediate_after"] == json.loads((out / "config.json").read_text())["intermediate_size"]
    assert main(["prune", str(tiny_glm4_dir), "--ratio", "1.5", "-o", str(tmp_path / "bad")]) == 1
