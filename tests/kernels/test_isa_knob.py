"""The CPU ISA knob: `AUTOGLM_CPU_ISA` / `--cpu-isa` choose the variant, the chosen one is reported (CpuKernels,
the decoder's ModuleInfo: start-up log line and /status/data), and asking for one this CPU lacks is a clear error
at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoglm.errors import CpuIsaError
from autoglm.kernels import kernels_label, select_kernels
from autoglm.kernels.cpu import cpu_kernels, variants


def test_auto_picks_the_best_variant_this_cpu_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(variants.ENV, raising=False)
    assert variants.resolve() == variants.available()[0]
    assert variants.available()[-1] == "scalar"


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_env_chooses_the_variant(monkeypatch: pytest.MonkeyPatch, isa: str) -> None:
    monkeypatch.setenv(variants.ENV, isa)
    k = select_kernels("cpu")
    assert getattr(k, "isa", None) == isa
    assert kernels_label(k) == f"cpu {isa}"
    assert cpu_kernels("avx512" if "avx512" in variants.available() else "scalar").isa != isa or isa == "scalar"


def test_missing_features_are_named() -> None:
    v = variants.variant("avx512")
    assert variants.missing(v, frozenset({"avx2", "fma", "f16c"}), "x86_64") == [
        "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"]
    assert variants.missing(variants.variant("neon"), frozenset(), "x86_64")  # wrong architecture


def test_unavailable_isa_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    lacking = "neon" if variants.machine() in ("x86_64", "AMD64") else "avx2"
    with pytest.raises(CpuIsaError, match=f"'{lacking}' was asked for.*lacks"):
        variants.resolve(lacking)
    monkeypatch.setenv(variants.ENV, lacking)
    with pytest.raises(CpuIsaError):
        select_kernels("cpu")
    monkeypatch.setenv(variants.ENV, "sse9")
    with pytest.raises(CpuIsaError, match="unknown CPU ISA 'sse9'"):
        select_kernels("cpu")


def test_cli_flag_rejects_an_unavailable_isa_at_start(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from autoglm.cli import main

    lacking = "neon" if variants.machine() in ("x86_64", "AMD64") else "avx2"
    rc = main(["--cpu-isa", lacking, "bench", str(tmp_path / "no-such.gguf")])
    assert rc == 1
    assert f"'{lacking}' was asked for" in capsys.readouterr().err


def test_loaded_decoder_reports_the_isa(monkeypatch: pytest.MonkeyPatch, tiny_gemma3_gguf_q8: Path) -> None:
    from autoglm.loader import load_model
    from autoglm.server.app import module_line

    monkeypatch.setenv(variants.ENV, "avx2")
    loaded = load_model(str(tiny_gemma3_gguf_q8), no_vision=True)
    info = loaded.modules[0]
    assert info.kernels == "cpu avx2"
    assert module_line(info).endswith("| kernels cpu avx2")  # the per-module start-up log line
    from dataclasses import asdict

    assert asdict(info)["kernels"] == "cpu avx2"  # /status/data's module rows are asdict(ModuleInfo)
