"""`quantization=` on load: the decoder's linear layers become int8/int4 layers and the model stays close to float."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoglm.errors import ModelLoadError
from autoglm.layers.linear.int4 import Int4Linear
from autoglm.layers.linear.int8 import Int8Linear
from autoglm.llm import LLM
from autoglm.loader import load_model

PROMPT = "hello world, this is a test of quantized loading"


@pytest.mark.parametrize(("mode", "cls", "tol"), [("int8", Int8Linear, 0.05), ("int4", Int4Linear, 0.5)])
def test_quantized_load_close_to_float(tiny_glm4_dir: Path, mode: str, cls: type, tol: float) -> None:
    ref = LLM(tiny_glm4_dir, dtype="float32").score(PROMPT)
    llm = LLM(tiny_glm4_dir, dtype="float32", quantization=mode)
    layers = [m for m in llm.model.decoder.modules() if isinstance(m, cls)]
    assert layers, f"no {cls.__name__} layers after quantization={mode}"
    got = llm.score(PROMPT)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel < tol, f"{mode}: max logit error {rel:.4f} of the logit scale"
    assert torch.isfinite(got).all()


def test_unknown_quantization_is_named(tiny_glm4_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="int3"):
        load_model(tiny_glm4_dir, quantization="int3")
