#!/usr/bin/env python
"""Regenerate the llama.cpp goldens for the built-in Gemma 3 270M Q4_K_M GGUF (needs llama-cpp-python).

    pip install llama-cpp-python==0.3.36   # or: pip install -e '.[llamacpp]'
    python scripts/make_goldens.py [--out tests/data/goldens]

Writes:
  gemma3_tokens.json  token ids llama.cpp gives for a set of texts (English, Chinese, code, emoji, whitespace runs,
                      special-token strings), with and without BOS, special tokens parsed (as llama-server does)
  gemma3_top1.json    per-position top-1 next-token ids (logits_all=True) for a few prompts
The tests (tests/models/test_gemma_goldens.py) read these files; they never call llama.cpp themselves.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Tokenization is the first step: it turns text into ids.",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "机器学习是人工智能的一个分支。",
    "日本語のテキストも少し。",
    "def square(x: int) -> int:\n    return x ** 2  # square it\n",
    'for (int i = 0; i < n; ++i) { sum += a[i]; }\nprintf("%d\\n", sum);',
    "emoji: 😀🎉👍🏽 ✨🤖 family 👨‍👩‍👧",
    "a    b\t\tc\n\n\nd   ",
    "   leading and trailing spaces   ",
    "\n\n\n\n",
    "\r\n windows line ends\r\n",
    "numbers 1234567890 and 3.14159, 2^10 = 1024",
    "naïve café résumé Ünïcödé",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<table><tr><td>cell</td></tr></table>",
    "",
]

PROMPTS = [
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\nprint(",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16",
    "北京是中国的首都，上海是中国最大的城市。",
    "The mitochondria is the powerhouse of the cell. Photosynthesis takes place in the",
]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    import llama_cpp

    from autoglm.builtins import builtin_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests/data/goldens")
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: the built-in gemma-3-270m)")
    args = ap.parse_args()
    path = args.model or builtin_path("gemma-3-270m")
    args.out.mkdir(parents=True, exist_ok=True)
    source = {"file": path.name, "sha256": sha256(path), "llama_cpp_python": llama_cpp.__version__}

    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    cases = []
    for text in TEXTS:
        for add_bos in (True, False):
            ids = vocab.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
            cases.append({"text": text, "add_bos": add_bos, "ids": list(map(int, ids))})
    (args.out / "gemma3_tokens.json").write_text(
        json.dumps({"source": source, "parse_special": True, "cases": cases}, ensure_ascii=False, indent=1) + "\n"
    )

    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=512, n_batch=512, n_threads=2, verbose=False, seed=0)
    prompts = []
    for text in PROMPTS:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        scores = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        top1 = scores.argmax(-1)
        # margin between the best and second-best logit: positions with a near-tie are the ones that may flip
        part = np.sort(scores, axis=-1)[:, -2:]
        prompts.append(
            {
                "text": text,
                "ids": list(map(int, ids)),
                "top1": top1.tolist(),
                "margin": [round(float(x), 4) for x in part[:, 1] - part[:, 0]],
            }
        )
    (args.out / "gemma3_top1.json").write_text(
        json.dumps({"source": source, "prompts": prompts}, ensure_ascii=False, indent=1) + "\n"
    )
    print(f"wrote {len(cases)} token cases and {sum(len(p['ids']) for p in prompts)} positions to {args.out}")


if __name__ == "__main__":
    main()
