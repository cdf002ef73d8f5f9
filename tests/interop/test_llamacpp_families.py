"""The common GGUF families (llama, qwen2, qwen3): llama.cpp's own converter on our tiny HF checkpoints -> autoglm
loads the GGUF and matches transformers; its tokenizer ids equal llama.cpp's; and `autoglm convert` output loads in
llama.cpp with the same logits. Needs llama-cpp-python (skips with the reason otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from autoglm.gguf.reader import GGUFFile
from autoglm.llm import LLM
from tests.interop.conftest import run_cli
from tests.interop.helpers import TEXTS, rel_err
from tests.models.harness import hf_logits, prompts, tiny_checkpoint

pytestmark = pytest.mark.llamacpp
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", SMALL),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {**SMALL, "tie_word_embeddings": True}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {**SMALL, "head_dim": 32}),
}
F32 = 1e-4  # llama.cpp's converter at f32 changes no value, only layouts: our logits stay transformers' logits


def _hf(name: str) -> type:
    import transformers

    return getattr(transformers, name)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Any]:
    arch = request.param
    model_cls, config_cls, cfg = FAMILIES[arch]
    d = tiny_checkpoint(_hf(model_cls), _hf(config_cls), tmp_path_factory.mktemp(arch), seed=5, **cfg)
    return arch, d, _hf(model_cls).from_pretrained(d, dtype=torch.float32).eval()


def test_llamacpp_converted_gguf_matches_transformers(llamacpp_converter, family, tmp_path: Path) -> None:
    arch, d, hf = family
    gguf = llamacpp_converter(d, tmp_path / f"{arch}-f32.gguf", "f32")
    assert GGUFFile(gguf).architecture == arch
    llm = LLM(gguf, dtype="float32")
    try:
        for ids in prompts(llm.model.decoder.vocab_size, (5, 17), seed=3):
            err = rel_err(llm.score(ids.tolist()), hf_logits(hf, ids))
            assert err <= F32, f"{arch}: logit error {err:.3g} of the scale"
    finally:
        llm.close()


def test_gguf_tokenizer_ids_equal_llamacpp(llamacpp_converter, family, tmp_path: Path) -> None:
    import llama_cpp

    arch, d, _ = family
    gguf = llamacpp_converter(d, tmp_path / f"{arch}-tok.gguf", "f32")
    llm = LLM(gguf, dtype="float32")
    ref = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        for text in (*TEXTS, "<|user|>hello<|assistant|>", "  two  spaces\n\nand 12345"):
            assert llm.tokenize(text, add_special_tokens=False) == ref.tokenize(text.encode(), add_bos=False,
                                                                                special=True), text
    finally:
        llm.close()


def test_our_convert_loads_in_llamacpp(family, tmp_path: Path) -> None:
    import llama_cpp

    arch, d, hf = family
    out = tmp_path / f"ours-{arch}.gguf"
    assert run_cli("convert", str(d), "-o", str(out), "--outtype", "f32", "--no-progress") == 0
    assert GGUFFile(out).architecture == arch
    ref = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=1, type_k=0,
                          type_v=0)  # f32 KV cache
    ids = prompts(hf.config.vocab_size, (13,), seed=4)[0]
    ref.eval(ids.tolist())
    theirs = np.array(ref.scores[: ids.shape[0]])
    err = rel_err(theirs, hf_logits(hf, ids).numpy())
    assert err <= 1e-3, f"{arch}: llama.cpp on our GGUF is {err:.3g} of the logit scale from transformers"
    ours = LLM(out, dtype="float32")
    try:
        assert rel_err(ours.score(ids.tolist()), hf_logits(hf, ids)) <= F32
    finally:
        ours.close()
