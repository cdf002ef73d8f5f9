"""Exit 0 when llama-cpp-python prefills and decodes a real GGUF (the built-in model) without crashing.

run_tests.sh runs it in a child process: a llama.cpp build that segfaults on this CPU must not take pytest down."""

from __future__ import annotations

import llama_cpp

from autoglm.builtins import default_model_path


def main() -> None:
    llm = llama_cpp.Llama(str(default_model_path()), n_ctx=512, n_threads=2, verbose=False)
    prompt = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 12)
    for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True)):
        if i == 8:
            break


if __name__ == "__main__":
    main()
