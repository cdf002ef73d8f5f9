"""Session fixtures for the llama.cpp interop tests: tame tiny GLM-4.1V checkpoints and llama.cpp's converter.

The checkpoints come from H1's writer (tests/fixtures/models.py); their attention q/k projections are scaled down
(x0.3) so attention is soft: with the writer's N(0, 0.15) weights it is nearly one-hot, and then the tiny noise of a
quantized matmul (llama.cpp quantizes activations too) flips attention and greedy tokens chaotically. Scaled, the
model is still random but smooth, so type-level differences stay type-level.

`llamacpp_converter` skips (with the reason) when llama-cpp-python is not installed: the converter ships in its
source distribution (vendor/llama.cpp), which `scripts/llamacpp_convert.py` fetches once into ~/.cache/autoglm-test.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from tests.fixtures.models import write_tiny_glm4v

ROOT = Path(__file__).resolve().parents[2]
QK_SCALE = 0.3


def tame(path: Path) -> Path:
    """Scale the text model's q/k projections (weights and biases) in place; see the module docstring."""
    from safetensors.torch import load_file, save_file

    for f in path.glob("*.safetensors"):
        sd = load_file(f)
        for k in sd:
            if "language_model" in k and (".q_proj." in k or ".k_proj." in k):
                sd[k] = sd[k] * QK_SCALE
        save_file(sd, f, metadata={"format": "pt"})
    return path


def converter_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("llamacpp_convert", ROOT / "scripts" / "llamacpp_convert.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class LlamaCppConverter:
    """Runs llama.cpp's convert_hf_to_gguf.py (through scripts/llamacpp_convert.py) in a subprocess."""

    def __init__(self, module: ModuleType) -> None:
        self.module = module
        self.dir = module.converter_dir()

    def __call__(self, hf_dir: Path, out: Path, outtype: str, *, mmproj: bool = False) -> Path:
        cmd = self.module.convert_command(hf_dir, out, outtype, mmproj=mmproj)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0 and out.is_file(), f"llama.cpp converter failed:\n{proc.stderr[-3000:]}"
        return out


@pytest.fixture(scope="session", autouse=True)
def _llamacpp_without_repacked_buffers() -> Any:
    """llama.cpp's extra (AMX / repacked) CPU buffer types crash `decode` on quantized weights in some VMs (seen
    here: SIGSEGV in llama_decode on AMX hosts); the plain CPU buffers compute the same model. Off for every Llama
    these tests open."""
    try:
        import llama_cpp.llama_cpp as lib
    except ImportError:
        yield None
        return
    default = lib.llama_model_default_params

    def params() -> Any:
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    yield None
    lib.llama_model_default_params = default


@pytest.fixture(scope="session")
def llamacpp_converter() -> LlamaCppConverter:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
    return LlamaCppConverter(converter_module())


@pytest.fixture(scope="session")
def interop_glm4v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tame tiny GLM-4.1V: hidden 64, 2 layers, vision depth 2 (GLM4V_CONFIGS[0])."""
    return tame(write_tiny_glm4v(tmp_path_factory.mktemp("interop_glm4v"), 0, seed=31))


@pytest.fixture(scope="session")
def interop_glm4v_other_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another GLM-4.1V (hidden 48): its mmproj projects to 48, not 64."""
    return tame(write_tiny_glm4v(tmp_path_factory.mktemp("interop_glm4v_48"), 1, seed=32))


@pytest.fixture(scope="session")
def interop_glm4v_256_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tame GLM-4.1V with hidden 256 (2 layers): rows of whole 256-element super-blocks, so Q4_K_M really uses
    Q4_K / Q6_K instead of falling back to the simple types."""
    d = tmp_path_factory.mktemp("interop_glm4v_256")
    return tame(write_tiny_glm4v(d, 0, seed=33, hidden_size=256, intermediate_size=512, mrope_section=[8, 4, 4]))


@pytest.fixture(scope="session")
def hf_glm4v_reference() -> Any:
    """Loader of transformers' Glm4vForConditionalGeneration (the oracle), cached per directory."""
    from transformers import Glm4vForConditionalGeneration

    cache: dict[Path, Any] = {}

    def load(d: Path) -> Any:
        if d not in cache:
            cache[d] = Glm4vForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
        return cache[d]

    return load


def run_cli(*argv: str) -> int:
    from autoglm.cli import main

    return main(list(argv))



def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Interop tests drive whole models: marked `model` (`pytest -m "not model"` is the fast subset)."""
    for item in items:
        if "tests/interop/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.model)
