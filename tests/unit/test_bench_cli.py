"""`autoglm bench`: the numbers are measured and consistent (token counts, units, JSON), for the float and quantized
HF paths, in-process and isolated; llama.cpp beside us when llama-cpp-python is installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoglm.bench import BenchConfig, BenchResult, bench_autoglm, decoder_weight_bytes, ratios, render_table


def _check(r: BenchResult, cfg: BenchConfig) -> None:
    assert r.engine == "autoglm" and r.prompt_len == cfg.prompt_len and r.gen_len == cfg.gen_len
    assert r.load_s > 0 and r.prefill_tok_s > 0 and r.decode_tok_s > 0 and r.ttft_s > 0
    assert r.peak_rss_bytes > 50 * 2**20
    assert r.weight_bytes > 0
    prefill, decode, ttft = r.extra["runs"][0]
    # TTFT covers the whole prompt: prompt tokens / prefill rate <= TTFT (single request)
    if cfg.concurrency == 1:
        assert cfg.prompt_len / prefill == pytest.approx(ttft, rel=0.05)


def test_bench_autoglm_inline(tiny_glm4_dir: Path) -> None:
    cfg = BenchConfig(model=str(tiny_glm4_dir), prompt_len=24, gen_len=6, threads=1)
    r = bench_autoglm(cfg)
    _check(r, cfg)
    assert r.quantization == "float32"


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_bench_quantized_weight_bytes_shrink(tiny_glm4_dir: Path, quant: str) -> None:
    from autoglm.loader.hf import load_hf

    dense = decoder_weight_bytes(load_hf(tiny_glm4_dir, dtype="float32").decoder)
    cfg = BenchConfig(model=str(tiny_glm4_dir), prompt_len=16, gen_len=4, threads=1, quantization=quant, concurrency=2)
    r = bench_autoglm(cfg)
    _check(r, cfg)
    assert r.quantization == quant
    assert r.weight_bytes < dense / 2.5  # 1 (or 0.5) byte per weight + scales vs 4 bytes


def test_bench_cli_isolated_json(tiny_glm4_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from autoglm.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", str(tiny_glm4_dir), "--prompt-len", "16", "--gen-len", "4", "--threads", "1",
               "--json", str(out)])  # fmt: skip
    assert rc == 0
    table = capsys.readouterr().out
    assert "prefill tok/s" in table and "autoglm" in table
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert row["read_bandwidth_gbs"] > 0 and row["decode_bound_tok_s"] > 0
    assert row["peak_rss_bytes"] > 0 and data["ratios"] == {}
    # flag validation and the GGUF requirement of --compare-llamacpp
    assert main(["bench", str(tiny_glm4_dir), "--gen-len", "0"]) == 1
    assert main(["bench", str(tiny_glm4_dir), "--compare-llamacpp", "--inline"]) == 1


def test_table_and_ratios() -> None:
    def row(engine: str, prefill: float, decode: float) -> BenchResult:
        return BenchResult(engine, "m", "Q4_K_M", 2, 512, 128, 1, 1.0, prefill, decode, 0.5, 2**30, 2**28, 20.0)

    rows = [row("autoglm", 600.0, 55.0), row("llama.cpp", 500.0, 50.0)]
    assert ratios(rows) == pytest.approx({"prefill": 1.2, "decode": 1.1, "peak_rss": 1.0})
    text = render_table(rows)
    assert "prefill 1.20x" in text and "decode 1.10x" in text
    assert rows[0].decode_bound_tok_s == pytest.approx(20e9 / 2**28)


@pytest.mark.llamacpp
def test_llamacpp_row_on_a_gguf() -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from autoglm.bench import bench_llamacpp
    from autoglm.builtins import builtin_path

    cfg = BenchConfig(model=str(builtin_path("gemma-3-270m")), prompt_len=16, gen_len=4, threads=1)
    r = bench_llamacpp(cfg)
    assert r.engine == "llama.cpp" and r.prefill_tok_s > 0 and r.decode_tok_s > 0 and r.load_s > 0
