"""`autoglm convert` output (f16, q8_0, q4_k_m) loads in llama.cpp (llama_cpp.Llama) and decodes like autoglm.

llama.cpp quantizes the activations of quantized matmuls (q8_0 / Q8_K) and we do not, so their logits differ by a
small type-dependent amount. Hence, per prompt:
- f16: free-running greedy tokens are identical;
- every type: along llama.cpp's greedy continuation (teacher-forced), autoglm's top-1 is llama.cpp's token at every
  step, or the two are a near-tie in autoglm's logits (gap <= TIE x logit scale); the logits themselves agree within
  LOGITS x logit scale.
Same token ids for the same text, too. Needs llama-cpp-python: skips with the reason otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autoglm.gguf.reader import GGUFFile
from autoglm.llm import LLM
from tests.interop.conftest import run_cli
from tests.interop.helpers import TEXTS, chat_ids, rel_err

LOGITS = {"f16": 5e-3, "q8_0": 5e-2, "q4_k_m": 8e-2}
TIE = {"f16": 0.0, "q8_0": 0.1, "q4_k_m": 0.15}
N_NEW = 12
pytestmark = pytest.mark.llamacpp
GGML_TYPE_F32 = 0  # KV cache in f32 on the llama.cpp side: its default f16 cache adds noise we do not have


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]')")


@pytest.fixture(scope="module")
def ours_files(interop_glm4v_256_dir: Path, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("ours_for_llamacpp")
    files = {}
    for t in LOGITS:
        path = out / f"glm4v-256-{t}.gguf"
        assert run_cli("convert", str(interop_glm4v_256_dir), "-o", str(path), "--outtype", t, "--no-progress") == 0
        files[t] = path
    return files


def test_q4_k_m_file_really_uses_k_quants(ours_files) -> None:
    types = {info.qtype.name for info in GGUFFile(ours_files["q4_k_m"]).tensors.values()}
    assert {"Q4_K", "Q6_K"} <= types, types


@pytest.mark.parametrize("outtype", list(LOGITS))
def test_llamacpp_runs_our_gguf_like_autoglm(llama_cpp, ours_files, outtype: str) -> None:
    path = ours_files[outtype]
    ours = LLM(path, dtype="float32")
    lc = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, logits_all=True,
                         type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    greedy = dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, ignore_eos=True)
    free_equal, worst, steps_exact, steps = 0, 0.0, 0, 0
    for text in TEXTS:
        assert lc.tokenize(text.encode(), add_bos=False, special=False) == ours.tokenize(text, add_special_tokens=False)
        ids = chat_ids(ours, text, with_image=False)
        mine = list(ours.generate(ids, max_tokens=N_NEW, **greedy).token_ids)
        theirs: list[int] = []
        for tok in lc.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            theirs.append(int(tok))
            if len(theirs) == N_NEW:
                break
        free_equal += mine == theirs
        if outtype == "f16":
            assert mine == theirs, f"{text!r}: autoglm {mine} vs llama.cpp {theirs}"
        # teacher-forced along llama.cpp's continuation
        full = ids + theirs
        s = ours.score(full).numpy()  # [T, V]
        lc.reset()
        lc.eval(full)
        lg = np.asarray(lc.scores[: len(full)])
        worst = max(worst, rel_err(s, lg))
        scale = float(np.abs(lg).max())
        for k, tok in enumerate(theirs):
            row = s[len(ids) - 1 + k]
            steps += 1
            steps_exact += int(row.argmax()) == tok
            gap = float(row.max() - row[tok])
            assert gap <= TIE[outtype] * scale, f"{text!r} step {k}: llama.cpp chose {tok}, ours {row.argmax()} " \
                f"by {gap:.3g} (scale {scale:.3g})"
    print(f"{outtype}: logits error / scale {worst:.2e}; top-1 == llama.cpp's greedy token at {steps_exact}/{steps} "
          f"steps; free-running greedy identical for {free_equal}/{len(TEXTS)} prompts")
    assert worst <= LOGITS[outtype]
