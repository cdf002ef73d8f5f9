"""`load_hf`: config spellings, sharding, name maps, per-module placement, and errors that name their cause."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from autoglm.errors import ConfigError, CorruptFile, ModelLoadError, UnsupportedArchitecture, WeightMismatch
from autoglm.layers.attention import AttentionContext
from autoglm.loader.hf import load_hf
from autoglm.models.config import TextConfig, VisionConfig
from tests.fixtures.models import write_tiny_glm4


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _logits(model: torch.nn.Module, n: int = 11) -> torch.Tensor:
    ids = torch.arange(n) * 7 % model.vocab_size
    pos = torch.arange(n).expand(3, n) if model.uses_mrope else torch.arange(n)
    with torch.inference_mode():
        return model.compute_logits(model(ids, pos, AttentionContext.no_cache([n])))


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _edit_weights(path: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


# --- what a load returns ------------------------------------------------------------------------------------------
def test_loaded_model_fields(tiny_glm4_dir: Path) -> None:
    lm = load_hf(tiny_glm4_dir)
    gen = json.loads((tiny_glm4_dir / "generation_config.json").read_text())
    assert lm.eos_token_ids == gen["eos_token_id"]
    assert lm.generation_defaults["temperature"] == gen["temperature"]
    assert lm.generation_defaults["top_p"] == gen["top_p"]
    assert lm.generation_defaults["top_k"] == gen["top_k"]
    assert lm.generation_defaults["repetition_penalty"] == gen["repetition_penalty"]
    assert lm.architecture == "Glm4ForCausalLM"
    assert lm.max_model_len == _config(tiny_glm4_dir)["max_position_embeddings"]
    assert lm.tokenizer is not None and lm.chat_template is not None
    assert lm.encoders == {}
    [info] = lm.modules
    params = list(lm.decoder.parameters())
    assert info.name == "decoder" and info.format == "safetensors" and info.device == "cpu"
    assert info.quantization == "float32"
    assert info.parameters == sum(p.numel() for p in params)
    assert info.bytes == 4 * info.parameters == info.bytes_by_type["float32"]
    assert info.load_seconds > 0
    assert all(not p.is_meta and not p.requires_grad for p in params)


def test_dtype_auto_follows_checkpoint_and_can_be_overridden(tmp_path: Path) -> None:
    path = write_tiny_glm4(tmp_path / "bf16", 0, dtype="bfloat16")
    assert _config(path)["dtype"] == "bfloat16"
    assert {p.dtype for p in load_hf(path).decoder.parameters()} == {torch.bfloat16}
    assert load_hf(path).modules[0].quantization == "bfloat16"
    assert {p.dtype for p in load_hf(path, dtype="float32").decoder.parameters()} == {torch.float32}
    assert {p.dtype for p in load_hf(path, dtype="float16").decoder.parameters()} == {torch.float16}
    # the converting read path yields the same values as the zero-copy one
    same = dict(load_hf(path).decoder.named_parameters())
    for name, p in load_hf(path, dtype="float32").decoder.named_parameters():
        torch.testing.assert_close(p, same[name].float(), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="int3"):
        load_hf(path, dtype="int3")


def test_tied_embeddings_share_storage(tiny_glm4_dirs: list[Path]) -> None:
    path = tiny_glm4_dirs[1]
    assert _config(path)["tie_word_embeddings"] is True
    model = load_hf(path).decoder
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_sharded_checkpoint_loads(tmp_path: Path, tiny_glm4_dir: Path) -> None:
    path = write_tiny_glm4(tmp_path / "sharded", 0, seed=0, max_shard_size="100KB")
    shards = sorted(path.glob("*.safetensors"))
    assert len(shards) >= 3 and (path / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(_logits(load_hf(path).decoder), _logits(load_hf(tiny_glm4_dir).decoder))


_MEMORY_PROBE = """
import json, sys
from pathlib import Path
from autoglm.loader.hf import load_hf
import torch, autoglm.models.glm4, autoglm.tokenizer.tokenizer, autoglm.tokenizer.chat_template

with torch.device("meta"):  # warm-up: torch imports its meta kernels (~70 MiB) on the first init op there
    torch.nn.Embedding(2, 2)

def status(key):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1]) * 1024

Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark (VmHWM) after the imports
base = status("VmRSS:")
lm = load_hf(sys.argv[1], dtype=sys.argv[2])
weights = sum(p.numel() * p.element_size() for p in lm.decoder.parameters())
print(json.dumps({"growth": status("VmHWM:") - base, "weights": weights}))
"""


@pytest.fixture(scope="module")
def float32_checkpoint_50mb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from autoglm.models.glm4 import Glm4ForCausalLM
    from tests.fixtures.tokenizer import write_glm_tokenizer

    d = tmp_path_factory.mktemp("mem50")
    cfg = dict(architectures=["Glm4ForCausalLM"], model_type="glm4", vocab_size=4096, hidden_size=512,
               intermediate_size=2048, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
               dtype="float32")  # fmt: skip
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Glm4ForCausalLM(TextConfig.from_dict(cfg)).named_parameters()}
    save_file({n: torch.randn(s) for n, s in shapes.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    write_glm_tokenizer(d)
    return d


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_memory_about_the_weights(float32_checkpoint_50mb: Path, dtype: str) -> None:
    """Loading (zero-copy, or cast tensor by tensor) grows peak RSS by about the loaded weights, not file + weights."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(float32_checkpoint_50mb), dtype],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2],
    ).stdout  # fmt: skip
    m = json.loads(out.strip().splitlines()[-1])
    print(f"{dtype}: peak RSS growth {m['growth'] / 2**20:.0f} MiB for {m['weights'] / 2**20:.0f} MiB of weights")
    # slack: the largest transient tensor and malloc keeping freed small blocks (measured: 5 MiB / 56 MiB here;
    # 90 MiB / 583 MiB for a 946 MiB float32 file loaded as float32 / bfloat16)
    assert m["growth"] <= 1.25 * m["weights"] + 32 * 2**20, m


# --- GLM-4.1V: names, no_vision, placement -----------------------------------------------------------------------
def test_glm4v_modules_and_no_vision(tiny_glm4v_dir: Path) -> None:
    full = load_hf(tiny_glm4v_dir)
    assert [m.name for m in full.modules] == ["decoder", "vision"]
    dec, vis = full.modules
    visual = sum(p.numel() for n, p in full.decoder.named_parameters() if n.startswith("visual."))
    assert vis.parameters == visual > 0
    assert dec.parameters + vis.parameters == sum(p.numel() for p in full.decoder.parameters())
    assert set(full.encoders) == {"image"}
    text = load_hf(tiny_glm4v_dir, no_vision=True)
    assert [m.name for m in text.modules] == ["decoder"] and text.encoders == {}
    assert not any(n.startswith("visual.") for n, _ in text.decoder.named_parameters())
    assert text.modules[0].parameters == dec.parameters
    torch.testing.assert_close(_logits(text.decoder), _logits(full.decoder))


def test_per_module_devices(tiny_glm4v_dir: Path) -> None:
    lm = load_hf(tiny_glm4v_dir, device={"decoder": "cpu", "vision": "meta"})
    devs = {n.split(".")[0]: p.device.type for n, p in lm.decoder.named_parameters()}
    assert devs == {"language_model": "cpu", "lm_head": "cpu", "visual": "meta"}
    assert [(m.name, m.device) for m in lm.modules] == [("decoder", "cpu"), ("vision", "meta")]
    with pytest.raises(ConfigError, match="speech"):
        load_hf(tiny_glm4v_dir, device={"decoder": "cpu", "speech": "cpu"})


def test_glm4v_older_checkpoint_names(tmp_path: Path, tiny_glm4v_dir: Path) -> None:
    """Pre-5.x exports name the text model `model.*` and the tower `visual.*`."""
    path = _copy(tiny_glm4v_dir, tmp_path)

    def rename(t: dict[str, torch.Tensor]) -> None:
        for k in list(t):
            new = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
            t[new] = t.pop(k)

    _edit_weights(path, rename)
    old = load_hf(path)
    assert sum(p.numel() for p in old.decoder.parameters()) == sum(
        p.numel() for p in load_hf(tiny_glm4v_dir).decoder.parameters()
    )
    torch.testing.assert_close(_logits(old.decoder), _logits(load_hf(tiny_glm4v_dir).decoder))


def test_glm4v_flat_45x_config(tmp_path: Path, tiny_glm4v_dir: Path) -> None:
    """transformers 4.5x wrote GLM-4.1V configs flat: rope_scaling + top-level rope_theta/partial_rotary_factor,
    torch_dtype; the loaded model must be the same."""
    path = _copy(tiny_glm4v_dir, tmp_path)
    cfg = _config(path)
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**text, **cfg, "model_type": "glm4v", "torch_dtype": cfg.pop("dtype")}
    flat.pop("dtype", None)
    flat["rope_scaling"] = {"type": "default", "mrope_section": rope["mrope_section"]}
    flat["rope_theta"] = rope["rope_theta"]
    flat["partial_rotary_factor"] = rope["partial_rotary_factor"]
    (path / "config.json").write_text(json.dumps(flat))
    a = TextConfig.from_dict(flat)
    b = TextConfig.from_dict(_config(tiny_glm4v_dir))
    assert a == b and a.uses_mrope and a.torch_dtype == "float32"
    torch.testing.assert_close(_logits(load_hf(path).decoder), _logits(load_hf(tiny_glm4v_dir).decoder))


# --- config parsing ---------------------------------------------------------------------------------------------
def test_text_config_spellings() -> None:
    base = dict(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4)
    new = TextConfig.from_dict(
        {**base, "model_type": "glm4", "head_dim": 32, "dtype": "bfloat16",
         "rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}}
    )  # fmt: skip
    old = TextConfig.from_dict(
        {**base, "model_type": "glm4", "head_dim": 32, "torch_dtype": "bfloat16", "rope_theta": 500.0,
         "partial_rotary_factor": 0.25}
    )  # fmt: skip
    assert new == old
    assert (new.head_dim, new.rotary_dim, new.rope_theta, new.torch_dtype) == (32, 8, 500.0, "bfloat16")
    assert new.num_key_value_heads == 4 and not new.uses_mrope
    glm4_default = TextConfig.from_dict({**base, "model_type": "glm4"})
    assert glm4_default.partial_rotary_factor == 0.5 and glm4_default.rotary_dim == 8  # Glm4Config's default
    nested = TextConfig.from_dict(
        {"model_type": "glm4v", "image_token_id": 7, "dtype": "float16",
         "text_config": {**base, "model_type": "glm4v_text", "num_key_value_heads": 2,
                         "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}}}
    )  # fmt: skip
    assert nested.image_token_id == 7 and nested.torch_dtype == "float16" and nested.num_key_value_heads == 2
    both = TextConfig.from_dict(
        {"image_token_id": 7, "text_config": {**base, "image_token_id": 9, "video_token_id": 10, "rope_theta": 5.0}}
    )
    assert (both.image_token_id, both.video_token_id, both.rope_theta) == (7, 10, 5.0)  # top level wins, as in HF
    assert nested.mrope_section == [2, 3, 3] and nested.rotary_dim == 16 and nested.uses_mrope
    from autoglm.models.gemma3 import Gemma3Config

    gemma = Gemma3Config.from_dict(
        {**base, "model_type": "gemma3_text", "head_dim": 16, "num_hidden_layers": 6,
         "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    )  # fmt: skip
    assert (gemma.rope_theta, gemma.rope_local_base_freq, gemma.rope_scaling_factor) == (1e6, 1e4, 8.0)
    with pytest.raises(ConfigError, match="yarn"):
        TextConfig.from_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="mrope_section"):
        TextConfig.from_dict({**base, "model_type": "glm4v_text", "rope_scaling": {"mrope_section": [1, 1, 1]}})
    with pytest.raises(ConfigError, match="hidden_size"):
        TextConfig.from_dict({"vocab_size": 10, "num_hidden_layers": 1, "num_attention_heads": 1})


def test_vision_config_spellings() -> None:
    assert VisionConfig.from_dict({"model_type": "glm4"}) is None
    a = VisionConfig.from_dict({"vision_config": {"depth": 2, "num_heads": 4, "hidden_size": 64}})
    b = VisionConfig.from_dict({"vision_config": {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}})
    assert a == b and a is not None and a.head_dim == 16


# --- errors name their cause ---------------------------------------------------------------------------------------
def test_missing_config_json(tmp_path: Path, tiny_glm4_dir: Path) -> None:
    path = _copy(tiny_glm4_dir, tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json not found") as e:
        load_hf(path)
    assert str(path / "config.json") in str(e.value)


def test_invalid_config_json(tmp_path: Path, tiny_glm4_dir: Path) -> None:
    path = _copy(tiny_glm4_dir, tmp_path)
    (path / "config.json").write_text('{"architectures": ["Glm4ForCausalLM"],')
    with pytest.raises(ConfigError, match="invalid JSON") as e:
        load_hf(path)
    assert str(path / "config.json") in str(e.value)


def test_missing_config_key(tmp_path: Path, tiny_glm4_dir: Path) -> None:
    path = _copy(tiny_glm4_dir, tmp_path)
    cfg = _config(path)
    del cfg["hidden_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="hidden_size") as e:
        load_hf(path)
    assert str(path / "config.json") in str(e.value)


def test_unsupported_architecture_lists_supported(tmp_path: Path, tiny_glm4_dir: Path) -> None:
    path = _copy(tiny_glm4_dir, tmp_path)
    cfg = _config(path)
    cfg["architectures"] = ["MambaForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture) as e:
        load_hf(path)
    msg = str(e.value)
    assert "MambaForCausalLM" in msg
    for name in ("Glm4ForCausalLM", "Glm4vForConditionalGeneration", "Gemma3ForCausalLM"):
        assert name in msg


def test_truncated_safetensors(tmp_path: Path, tiny_glm4_dir: Path) -> None:
    path = _copy(tiny_glm4_dir, tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CorruptFile) as e:
        load_hf(path)
    assert str(f) in str(e.value)


def test_garbage_safetensors(tmp_path: Path, tiny_glm4_dir: Path) -> None:
    path = _copy(tiny_glm4_dir, tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a json header")
    with pytest.raises(CorruptFile, match="model.safetensors"):
        load_hf(path)


def test_no_weight_files(tmp_path: Path, tiny_glm4_dir: Path) -> None:
    path = _copy(tiny_glm4_dir, tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_hf(path)


def test_missing_tensor_named(tmp_path: Path, tiny_glm4_dir: Path) -> None:
    path = _copy(tiny_glm4_dir, tmp_path)
    _edit_weights(path, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(WeightMismatch, match=r"missing.*model\.layers\.1\.mlp\.down_proj\.weight"):
        load_hf(path)


def test_extra_tensor_named(tmp_path: Path, tiny_glm4_dir: Path) -> None:
    path = _copy(tiny_glm4_dir, tmp_path)
    _edit_weights(path, lambda t: t.update({"model.layers.0.mlp.surprise.weight": torch.zeros(3)}))
    with pytest.raises(WeightMismatch, match=r"unexpected.*model\.layers\.0\.mlp\.surprise\.weight"):
        load_hf(path)


def test_shape_mismatch_named(tmp_path: Path, tiny_glm4_dir: Path) -> None:
    path = _copy(tiny_glm4_dir, tmp_path)
    _edit_weights(path, lambda t: t.update({"model.norm.weight": torch.ones(5)}))
    with pytest.raises(WeightMismatch, match=r"model\.norm\.weight: file \(5,\) vs model \(64,\)"):
        load_hf(path)


def test_missing_shard_named(tmp_path: Path) -> None:
    path = write_tiny_glm4(tmp_path / "sharded", 0, max_shard_size="100KB")
    victim = sorted(path.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(ModelLoadError, match=victim.name):
        load_hf(path)


# --- registry and the generic fill helper (shared with the GGUF loader) ----------------------------------------------
def test_registry_tables() -> None:
    from autoglm.models import glm4, llama, qwen2
    from autoglm.models.registry import gguf_module, hf_spec

    assert hf_spec({"model_type": "glm4"}).architecture == "Glm4ForCausalLM"  # no `architectures`: by model_type
    assert hf_spec({"architectures": ["Foo", "Glm4vForConditionalGeneration"]}).vision_prefix == "visual."
    assert hf_spec({"architectures": ["MistralForCausalLM"]}).module is llama
    assert hf_spec({"model_type": "qwen2"}).module is qwen2
    assert gguf_module("glm4") is glm4 and gguf_module("llama") is llama
    with pytest.raises(UnsupportedArchitecture, match=r"'falcon'.*gemma3.*glm4.*llama.*qwen2.*qwen3"):
        gguf_module("falcon")


def test_fill_parameters_contract() -> None:
    from autoglm.loader.weights import fill_parameters

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(3, 2)
            self.register_buffer("scale", torch.empty(2))
            self.register_buffer("scratch", torch.empty(4), persistent=False)  # derived: never loaded

    with torch.device("meta"):
        m = Tiny()
    good = [("a.weight", torch.ones(2, 3)), ("a.bias", torch.zeros(2)), ("scale", torch.full((2,), 2.0))]
    report = fill_parameters(m, [*good, ("vision.x", torch.zeros(1))], source="t", dtype=torch.float16,
                             drop=lambda n: n.startswith("vision."), group_of=lambda n: n.split(".")[0])  # fmt: skip
    assert m.a.weight.dtype == torch.float16 and not m.a.weight.requires_grad and m.scale.tolist() == [2.0, 2.0]
    assert report.dropped == ["vision.x"] and sorted(report.filled) == ["a.bias", "a.weight", "scale"]
    assert set(report.seconds) == {"a", "scale", "vision"}
    with torch.device("meta"):
        m = Tiny()
    with pytest.raises(WeightMismatch) as e:
        fill_parameters(m, [good[0], good[0], ("a.bias", torch.zeros(3))], source="file.gguf")
    msg = str(e.value)
    assert msg.startswith("file.gguf: ") and "a.weight (duplicate)" in msg and "missing from the file: scale" in msg
    assert "a.bias: file (3,) vs model (2,)" in msg
