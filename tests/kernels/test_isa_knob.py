"""The CPU ISA knob: `AUTOGLM_CPU_ISA` / `--cpu-isa` choose the variant, the chosen one is reported (CpuKernels,
the decoder's ModuleInfo: start-up log line and /status/data), and asking for one this CPU lacks is a clear error
at start. The flag is a value handed down (ServerConfig / BenchConfig / LLM -> `load_model(cpu_isa=...)`), never
written into the environment."""

from __future__ import annotations

import os
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
    k2 = cpu_kernels(isa)  # an explicit argument beats the environment the same way
    assert k2 is not None and k2.isa == isa and k2 is not k  # a new object per call: no process-wide instance


def test_missing_features_are_named() -> None:
    v = variants.variant("avx512")
    assert variants.missing(v, frozenset({"avx2", "fma", "f16c"}), "x86_64") == [
        "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"]
    assert variants.missing(variants.variant("neon"), frozenset(), "x86_64")  # wrong architecture


def test_avxvnni_needs_avx_vnni_and_builds_the_avx2_sources() -> None:
    v = variants.variant("avxvnni")
    assert variants.missing(v, frozenset({"avx2", "fma", "f16c", "bmi2", "movbe"}), "x86_64") == ["avx_vnni"]
    assert v.isa_macro == "AUTOGLM_ISA_AVX2" and "-mavxvnni" in v.cflags
    # best first: an AVX-512 CPU takes avx512, an AVX-VNNI-only one (Intel 12th gen+) avxvnni, then avx2
    names = [x.name for x in variants.VARIANTS]
    assert names.index("avx512") < names.index("avxvnni") < names.index("avx2")


def test_cli_choices_are_the_variants() -> None:
    from autoglm.cli import CPU_ISA_CHOICES

    assert CPU_ISA_CHOICES == variants.CHOICES


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


# --- the flag / argument is a value handed down, never written to the environment ------------------------------
def _gguf_kernels(loaded: object) -> list[object]:
    from autoglm.layers.linear.gguf import GGUFEmbedding, GGUFLinear

    decoder = loaded.decoder  # type: ignore[attr-defined]
    return [m.impl for m in decoder.modules() if isinstance(m, GGUFLinear | GGUFEmbedding)]


def test_load_model_cpu_isa_argument_chooses_the_variant(
    monkeypatch: pytest.MonkeyPatch, tiny_gemma3_gguf_q8: Path
) -> None:
    from autoglm.kernels.base import UsesKernels
    from autoglm.loader import load_model

    monkeypatch.setenv(variants.ENV, "auto")  # the argument beats the environment's default ...
    loaded = load_model(str(tiny_gemma3_gguf_q8), no_vision=True, cpu_isa="scalar")
    assert os.environ[variants.ENV] == "auto"  # ... and leaves it as it was
    assert loaded.modules[0].kernels == "cpu scalar"
    impls = _gguf_kernels(loaded)
    assert impls and all(getattr(k, "isa", None) == "scalar" for k in impls)
    bound = [m.kernels for m in loaded.decoder.modules() if isinstance(m, UsesKernels)]  # norms, rope, attention
    assert bound and all(k is impls[0] for k in bound)  # one Kernels object for the whole decoder
    monkeypatch.delenv(variants.ENV)
    assert load_model(str(tiny_gemma3_gguf_q8), no_vision=True, cpu_isa="avx2").modules[0].kernels == "cpu avx2"
    assert variants.ENV not in os.environ


def test_serve_flag_reaches_the_loaded_model_through_the_config(
    monkeypatch: pytest.MonkeyPatch, tiny_gemma3_gguf_q8: Path
) -> None:
    from fastapi.testclient import TestClient

    from autoglm import cli
    from autoglm.commands import serve as serve_command
    from autoglm.server.app import create_app
    from autoglm.server.config import ServerConfig

    monkeypatch.delenv(variants.ENV, raising=False)
    configs: list[ServerConfig] = []
    monkeypatch.setattr(serve_command, "serve", lambda config: configs.append(config) or 0)  # no socket, no uvicorn
    argv = ["--cpu-isa", "scalar", "serve", str(tiny_gemma3_gguf_q8), "--no-speech", "--no-vision",
            "--max-model-len", "64", "--max-num-seqs", "1"]
    assert cli.main(argv) == 0
    assert variants.ENV not in os.environ  # the flag was not handed over as $AUTOGLM_CPU_ISA
    (config,) = configs
    assert config.cpu_isa == "scalar"
    with TestClient(create_app(config)) as client:  # the lifespan loads config.model with config.cpu_isa
        modules = client.get("/status/data").json()["modules"]
    assert modules[0]["name"] == "decoder" and modules[0]["kernels"] == "cpu scalar"
    assert variants.ENV not in os.environ
    assert ServerConfig.from_sources({}, environ={variants.ENV: "avx2"}).cpu_isa is None  # env: read at selection
    lacking = "neon" if variants.machine() in ("x86_64", "AMD64") else "avx2"
    with pytest.raises(CpuIsaError, match="lacks"):
        ServerConfig(cpu_isa=lacking)  # a config built in code is checked before any model is read


@pytest.mark.parametrize("command", ["run", "chat"])
def test_run_and_chat_flag_reaches_the_loaded_model(
    monkeypatch: pytest.MonkeyPatch, tiny_gemma3_gguf_q8: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from autoglm import cli, llm

    made: list[llm.LLM] = []

    class Recording(llm.LLM):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    monkeypatch.setattr(llm, "LLM", Recording)
    monkeypatch.setenv(variants.ENV, "auto")
    assert cli.main(["--cpu-isa", "scalar", command, str(tiny_gemma3_gguf_q8), "hi", "--max-tokens", "1"]) == 0
    assert os.environ[variants.ENV] == "auto"
    assert made and made[0].model.modules[0].kernels == "cpu scalar"


def test_inspect_reports_the_kernels_in_use(tiny_gemma3_gguf_q8: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from autoglm import cli

    assert cli.main(["--cpu-isa", "scalar", "inspect", str(tiny_gemma3_gguf_q8), "--json"]) == 0
    decoder = json.loads(capsys.readouterr().out)["modules"][0]
    assert decoder["name"] == "decoder" and decoder["kernels"] == "cpu scalar"
    assert cli.main(["--cpu-isa", "scalar", "inspect", str(tiny_gemma3_gguf_q8)]) == 0
    assert "cpu scalar" in capsys.readouterr().out


def test_bench_flag_goes_into_the_bench_config(monkeypatch: pytest.MonkeyPatch, tiny_gemma3_gguf_q8: Path) -> None:
    from autoglm import bench, cli

    seen: list[bench.BenchConfig] = []

    def fake_bench(cfg: bench.BenchConfig) -> bench.BenchResult:
        seen.append(cfg)
        raise CpuIsaError("stop here")  # the loader is covered above; only the config matters

    monkeypatch.setattr(bench, "bench_autoglm", fake_bench)
    monkeypatch.delenv(variants.ENV, raising=False)
    assert cli.main(["--cpu-isa", "scalar", "bench", str(tiny_gemma3_gguf_q8), "--inline"]) == 1
    assert [c.cpu_isa for c in seen] == ["scalar"] and variants.ENV not in os.environ
