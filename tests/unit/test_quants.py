"""GGUF block formats: bit-exact dequantization vs gguf.quants, quantizers, the Q4_K_M mixture, `autoglm quantize`."""

from __future__ import annotations

import argparse
import ctypes
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoglm.commands import quantize as quantize_cmd
from autoglm.errors import CorruptFile, UnsupportedQuantType
from autoglm.gguf.quants import (
    SUPPORTED_TYPES,
    QuantMix,
    dequantize,
    q4_k_m_type_for,
    quantize,
)

Q = GGMLQuantizationType

# byte offsets of the fp16 fields inside one block (forced finite: random bits there may be inf/NaN)
FP16_FIELDS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    Q.Q8_0: (0,),
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
    Q.IQ4_NL: (0,),
    Q.IQ4_XS: (0,),
}
# types gguf.quants can decode (Q8_K it cannot: that one is checked against llama.cpp below)
ORACLE_TYPES = [t for t in SUPPORTED_TYPES if t != Q.Q8_K]
SIMPLE_QUANTS = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
K_QUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def _finite_f16(b: np.ndarray) -> np.ndarray:
    # [n, 2] bytes of fp16 -> the same bits with inf/NaN (exponent all ones) turned finite by clearing one bit
    bits = b.copy().view(np.uint16)
    bad = (bits & 0x7C00) == 0x7C00
    bits[bad] &= np.uint16(0xBFFF)
    return bits.view(np.uint8)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@st.composite
def raw_tensor(draw: st.DrawFn, qtype: GGMLQuantizationType) -> tuple[np.ndarray, tuple[int, int]]:
    """Random bytes for a [rows, blocks*block_size] tensor of `qtype`, fp16 scale fields finite."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    rows = draw(st.integers(1, 3))
    per_row = draw(st.integers(1, 3)) * (32 if bs == 1 else 1)
    raw = np.frombuffer(draw(st.binary(min_size=rows * per_row * ts, max_size=rows * per_row * ts)), np.uint8)
    blocks = raw.copy().reshape(-1, ts)
    for off in (0,) if qtype == Q.F16 else FP16_FIELDS.get(qtype, ()):
        blocks[:, off : off + 2] = _finite_f16(blocks[:, off : off + 2])
    return blocks.reshape(rows, per_row * ts), (rows, per_row * bs)


@pytest.mark.parametrize("qtype", ORACLE_TYPES, ids=lambda t: t.name)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_dequantize_bit_exact_vs_gguf(qtype: GGMLQuantizationType, data: st.DataObject) -> None:
    raw, shape = data.draw(raw_tensor(qtype))
    oracle_in = raw.view(np.float32) if qtype == Q.F32 else raw.view(np.float16) if qtype == Q.F16 else raw
    want = gguf.quants.dequantize(oracle_in, qtype)
    got = dequantize(raw, qtype, shape, name="t").numpy()
    assert got.dtype == np.float32
    assert _bits_equal(want.reshape(shape), got)
    # torch tensors and numpy arrays are accepted alike
    assert _bits_equal(got, dequantize(torch.from_numpy(raw.copy()), qtype, shape).numpy())


def test_dequantize_large_tensor_exact() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((80, 1024)).astype(np.float32)
    raw = gguf.quants.quantize(x, Q.Q8_0)
    assert _bits_equal(gguf.quants.dequantize(raw, Q.Q8_0), dequantize(raw, Q.Q8_0, x.shape).numpy())


def test_dequantize_chunk_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    import autoglm.gguf.blocks as blocks

    monkeypatch.setattr(blocks, "_CHUNK_BLOCKS", 3)
    rng = np.random.default_rng(2)
    raw = quantize(rng.standard_normal((5, 512)).astype(np.float32), Q.Q6_K)
    assert _bits_equal(gguf.quants.dequantize(raw, Q.Q6_K), dequantize(raw, Q.Q6_K, (5, 512)).numpy())


def test_unsupported_type_names_type_and_tensor() -> None:
    raw = np.zeros((1, GGML_QUANT_SIZES[Q.IQ2_XXS][1]), np.uint8)
    with pytest.raises(UnsupportedQuantType) as e:
        dequantize(raw, Q.IQ2_XXS, (1, 256), name="blk.3.ffn_up.weight")
    assert "IQ2_XXS" in str(e.value) and "blk.3.ffn_up.weight" in str(e.value)
    with pytest.raises(UnsupportedQuantType, match="99") as e:
        dequantize(raw, 99, (1, 256), name="weird")
    assert "weird" in str(e.value)


def test_bad_sizes_are_clear_errors() -> None:
    raw = np.zeros((2, 34), np.uint8)
    with pytest.raises(CorruptFile, match="tok.weight"):
        dequantize(raw, Q.Q8_0, (3, 32), name="tok.weight")
    with pytest.raises(UnsupportedQuantType, match="block size"):
        dequantize(raw, Q.Q8_0, (2, 48), name="x")
    with pytest.raises(UnsupportedQuantType, match="block size"):
        quantize(np.zeros((2, 100), np.float32), Q.Q4_K, name="y")


# --- quantizers -------------------------------------------------------------------------------------------------
block_values = st.lists(
    st.one_of(st.just(0.0), st.floats(-1e3, 1e3, width=32, allow_subnormal=False)), min_size=32, max_size=32
)


@pytest.mark.parametrize("qtype", SIMPLE_QUANTS, ids=lambda t: t.name)
@settings(max_examples=60, deadline=None)
@given(blocks=st.lists(block_values, min_size=1, max_size=4))
def test_simple_quantizers_bit_exact_vs_gguf(qtype: GGMLQuantizationType, blocks: list[list[float]]) -> None:
    x = np.array(blocks, np.float32)
    assert np.array_equal(gguf.quants.quantize(x, qtype), quantize(x, qtype))


@pytest.mark.parametrize("qtype", SIMPLE_QUANTS, ids=lambda t: t.name)
def test_blocks_whose_scale_underflows_match_gguf(qtype: GGMLQuantizationType) -> None:
    # values ~1e-38 give a scale whose inverse is inf: gguf's cast turns the NaN / inf codes into 0 (hypothesis found
    # 4.14e-38 beside zeros for Q5_1)
    rng = np.random.default_rng(0)
    for v in (4.1402467e-38, 1.2e-38, 2e-38, 5e-38, -4.14e-38):
        for pos in (0, 5, 31):
            x = np.zeros((1, 32), np.float32)
            x[0, pos] = v
            y = (rng.standard_normal((1, 32)) * v).astype(np.float32)
            with np.errstate(all="ignore"):
                assert np.array_equal(gguf.quants.quantize(x, qtype), quantize(x, qtype)), (v, pos)
                assert np.array_equal(gguf.quants.quantize(y, qtype), quantize(y, qtype)), (v, pos)


def test_float_encoders_match_numpy() -> None:
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32) * 1000
    assert np.array_equal(quantize(x, Q.F32).view(np.float32), x)
    assert np.array_equal(quantize(x, Q.F16).view(np.float16), x.astype(np.float16))
    assert np.array_equal(quantize(x, Q.BF16), gguf.quants.quantize(x, Q.BF16))


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.fixture(scope="module")
def weights() -> np.ndarray:
    # heavy-tailed like real weights, plus rows with structure the searches must handle
    rng = np.random.default_rng(4)
    x = (rng.standard_t(5, (64, 512)) * 0.02).astype(np.float32)
    x[0] = 0.0  # all-zero row
    x[1] = 0.5  # constant row
    x[2] = -np.abs(x[2])  # all negative
    x[3, :256] = rng.uniform(0.1, 1, 256)  # all positive block
    return x


def test_k_quant_error_ordering(weights: np.ndarray) -> None:
    x = weights[4:]  # the weight-like rows (the first four are edge cases)
    err = {q: _rmse(gguf.quants.dequantize(quantize(x, q), q), x) for q in [*K_QUANTS, *SIMPLE_QUANTS]}
    assert err[Q.Q8_0] < err[Q.Q6_K] < err[Q.Q5_K] < err[Q.Q4_K] < err[Q.Q3_K] < err[Q.Q2_K]
    # at the same bits per weight (4.5, 5.5) the K-quants beat the legacy formats
    assert err[Q.Q4_K] < err[Q.Q4_0]
    assert err[Q.Q5_K] < err[Q.Q5_0]
    assert err[Q.Q6_K] < 0.3 * err[Q.Q4_0]
    assert err[Q.Q4_K] < 0.1 * float(np.std(x))


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_k_quant_edge_rows_and_round_trip(weights: np.ndarray, qtype: GGMLQuantizationType) -> None:
    raw = quantize(weights, qtype)
    assert raw.shape == (64, 2 * GGML_QUANT_SIZES[qtype][1]) and raw.dtype == np.uint8
    y = gguf.quants.dequantize(raw, qtype)
    assert np.isfinite(y).all()
    assert not y[0].any()  # zeros stay exactly zero
    assert _rmse(y[1], weights[1]) < 0.02  # a constant row is (nearly) representable
    # re-quantizing what a format can represent barely moves it
    z = gguf.quants.dequantize(quantize(y, qtype), qtype)
    assert _rmse(z, y) <= 0.35 * _rmse(y, weights)


def _llama_cpp_ref(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install -e .[llamacpp])")
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    fn = getattr(lib, f"quantize_row_{qtype.name.lower().replace('_k', '_K')}_ref")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    bs, ts = GGML_QUANT_SIZES[qtype]
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // bs * ts), np.uint8)
    fn(x.ctypes.data, out.ctypes.data, x.size)
    return out


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", [*SIMPLE_QUANTS, *K_QUANTS], ids=lambda t: t.name)
def test_quantizers_match_llama_cpp_reference(weights: np.ndarray, qtype: GGMLQuantizationType) -> None:
    want = _llama_cpp_ref(weights, qtype)
    got = quantize(weights, qtype)
    ts = GGML_QUANT_SIZES[qtype][1]
    same = (want.reshape(-1, ts) == got.reshape(-1, ts)).all(axis=1).mean()
    # simple types are exact; K-quants follow the reference step by step (rare last-bit ties aside)
    assert same == 1.0 if qtype in SIMPLE_QUANTS else same >= 0.95
    e_ref = _rmse(gguf.quants.dequantize(want, qtype), weights)
    e_ours = _rmse(gguf.quants.dequantize(got, qtype), weights)
    assert e_ours <= e_ref * 1.005


# --- Q4_K_M mixture ---------------------------------------------------------------------------------------------
def test_q4_k_m_mixture_follows_llama_cpp() -> None:
    n = 32  # use_more_bits: layers 0-3, 28-31 and every third from 6
    more = {i for i in range(n) if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2}
    assert {0, 3, 6, 9, 27, 28, 31} <= more and not {4, 5, 7, 8, 26} & more
    for i in range(n):
        want = Q.Q6_K if i in more else Q.Q4_K
        assert q4_k_m_type_for(f"blk.{i}.attn_v.weight", i, n) == want
        assert q4_k_m_type_for(f"blk.{i}.attn_qkv.weight", i, n) == want
        assert q4_k_m_type_for(f"blk.{i}.ffn_down.weight", i, n) == want
        for other in ("attn_q", "attn_k", "attn_output", "ffn_up", "ffn_gate"):
            assert q4_k_m_type_for(f"blk.{i}.{other}.weight", i, n) == Q.Q4_K
    assert q4_k_m_type_for("output.weight", None, n) == Q.Q6_K
    assert q4_k_m_type_for("token_embd.weight", None, n) == Q.Q4_K
    assert q4_k_m_type_for("token_embd.weight", None, n, tied_embeddings=True) == Q.Q6_K
    # rows that are not whole super-blocks fall back like llama.cpp
    assert q4_k_m_type_for("blk.5.ffn_up.weight", 5, n, n_cols=96) == Q.Q5_0
    assert q4_k_m_type_for("blk.0.ffn_down.weight", 0, n, n_cols=96) == Q.Q8_0
    assert q4_k_m_type_for("blk.5.ffn_up.weight", 5, n, n_cols=40) == Q.F16
    assert q4_k_m_type_for("output.weight", None, n, n_cols=96) == Q.Q8_0
    mix = QuantMix.parse("Q4_K_M")
    assert mix.type_for("blk.0.attn_norm.weight", (256,), n) == Q.F32
    assert mix.type_for("blk.0.attn_q.bias", (256,), n) == Q.F32
    with pytest.raises(UnsupportedQuantType, match="q9_9"):
        QuantMix.parse("q9_9")


# --- autoglm quantize -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    path = str(tmp_path_factory.mktemp("quant") / "tiny-f32.gguf")
    w = GGUFWriter(path, "llama")
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(256)
    w.add_rope_freq_base(10000.0)
    w.add_token_list(["<s>", "a", "b", "c"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tensors: dict[str, np.ndarray] = {"token_embd.weight": rng.standard_normal((8, 256)), "output_norm.weight": None}
    tensors["output_norm.weight"] = rng.standard_normal(256)
    for i in range(2):
        tensors[f"blk.{i}.attn_norm.weight"] = rng.standard_normal(256)
        tensors[f"blk.{i}.attn_v.weight"] = rng.standard_normal((16, 256)) * 0.02
        tensors[f"blk.{i}.attn_q.weight"] = rng.standard_normal((16, 256)) * 0.02
        tensors[f"blk.{i}.attn_q.bias"] = rng.standard_normal(16)
        tensors[f"blk.{i}.ffn_down.weight"] = rng.standard_normal((256, 64)) * 0.02  # 64-wide rows: fallback
    for name, t in tensors.items():
        t32 = np.asarray(t, np.float32)
        tensors[name] = t32
        w.add_tensor(name, t32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, tensors


def _fields(r: GGUFReader) -> dict[str, object]:
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("target", ["q4_k_m", "q8_0", "f16", "q6_k"])
def test_quantize_command_round_trips(tiny_gguf: tuple[str, dict[str, np.ndarray]], tmp_path, target: str) -> None:
    src, tensors = tiny_gguf
    dst = str(tmp_path / f"tiny-{target}.gguf")
    rep = quantize_cmd.quantize_gguf(src, dst, target, progress=False)
    r_in, r_out = GGUFReader(src), GGUFReader(dst)
    meta_in, meta_out = _fields(r_in), _fields(r_out)
    assert meta_out.pop("general.file_type") == int(QuantMix.parse(target).file_type)
    meta_in.pop("general.file_type")
    assert meta_out == meta_in  # every other key copied as it was
    out = {t.name: t for t in r_out.tensors}
    assert list(out) == list(tensors)
    for name, want in tensors.items():
        t = out[name]
        assert tuple(reversed(t.shape.tolist())) == want.shape
        assert t.tensor_type == rep.tensor_types[name]
        got = dequantize(t.data, t.tensor_type, want.shape, name=name).numpy()
        if want.ndim == 1:  # norms and biases stay F32, untouched
            assert t.tensor_type == Q.F32 and np.array_equal(got, want)
        else:
            assert _rmse(got, want) < 0.1 * float(np.std(want)), name
    if target == "q4_k_m":
        # of 2 layers llama.cpp's use_more_bits picks only the last
        assert out["blk.0.attn_v.weight"].tensor_type == Q.Q4_K
        assert out["blk.1.attn_v.weight"].tensor_type == Q.Q6_K
        assert out["blk.1.attn_q.weight"].tensor_type == Q.Q4_K
        assert out["token_embd.weight"].tensor_type == Q.Q6_K  # tied: no output.weight
        assert out["blk.1.ffn_down.weight"].tensor_type == Q.Q8_0  # Q6_K -> Q8_0 for 64-wide rows
        assert out["blk.0.ffn_down.weight"].tensor_type == Q.Q5_0  # Q4_K -> Q5_0


def test_quantize_cli_entry(tiny_gguf: tuple[str, dict[str, np.ndarray]], tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser(prog="autoglm")
    quantize_cmd.register(parser.add_subparsers(dest="command"))
    dst = tmp_path / "out.gguf"
    args = parser.parse_args(["quantize", tiny_gguf[0], str(dst), "Q8_0", "--no-progress"])
    assert args.func(args) == 0 and dst.exists()
    assert "Q8_0" in capsys.readouterr().out
    args = parser.parse_args(["quantize", str(tmp_path / "missing.gguf"), str(dst), "q8_0", "--no-progress"])
    assert args.func(args) == 1
    assert "missing.gguf" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", "a.gguf", "b.gguf", "q7_x"])


# --- the real llama.cpp-made Q4_K_M file (the built-in default model) -------------------------------------------
@pytest.fixture(scope="module")
def gemma_reader() -> GGUFReader:
    from autoglm.builtins import builtin_path

    return GGUFReader(builtin_path("gemma-3-270m"))


def test_real_q4_k_m_file_mixture_and_dequant(gemma_reader: GGUFReader) -> None:
    r = gemma_reader
    n_layers = int(r.fields[f"{r.fields['general.architecture'].contents()}.block_count"].contents())
    tied = "output.weight" not in {t.name for t in r.tensors}
    mix = QuantMix.parse("q4_k_m")
    seen: dict[GGMLQuantizationType, int] = {}
    for t in r.tensors:
        shape = tuple(reversed(t.shape.tolist()))
        # our mixture rule picks the type llama-quantize picked, for every tensor (fallbacks included)
        assert mix.type_for(t.name, shape, n_layers, tied_embeddings=tied) == t.tensor_type, t.name
        if seen.get(t.tensor_type, 0) < 2 and t.n_elements <= 1 << 22:  # two of each type, bit-exact vs gguf
            seen[t.tensor_type] = seen.get(t.tensor_type, 0) + 1
            want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            assert _bits_equal(want, dequantize(t.data, t.tensor_type, shape, name=t.name).numpy()), t.name
    assert {Q.Q4_K, Q.Q6_K} <= set(seen)
