"""Every curl and Python client example in README.md runs as written against ONE default server (no model
argument, speech on: the built-in Qwen2.5-Coder-0.5B-Instruct + Whisper base), with only the port rewritten.

Extracted: ```bash blocks that call `curl http://127.0.0.1:8000...`, and ```python blocks that use the openai,
langchain_openai or ollama clients or `autoglm.LLM`. A block preceded by the line `<!-- readme-test: skip REASON -->`
is not for the default server (a real AutoGLM-Phone-9B checkpoint, an image): it is not run, and must name why.
Each example must exit 0, and no curl in it may get an HTTP error status (`curl --fail-with-body`).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.server import REPO_ROOT, ServerProcess

README = REPO_ROOT / "README.md"
SKIP_MARK = re.compile(r"<!--\s*readme-test:\s*skip\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
CURL = re.compile(r"\bcurl\b[^\n]*http://127\.0\.0\.1:8000")
PY_CLIENTS = re.compile(r"^\s*(from|import)\s+(openai|langchain_openai|ollama|autoglm)\b", re.M)
EXAMPLE_TIMEOUT = 600


@dataclass(frozen=True)
class Example:
    lang: str
    line: int
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.lang}-L{self.line}"


def readme_examples(text: str) -> list[Example]:
    """The README's client examples, in order, with their skip markers."""
    out: list[Example] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(1):
            i += 1
            continue
        lang, start = m.group(1), i
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        code = "\n".join(lines[start + 1:j]) + "\n"
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        skip = SKIP_MARK.search(prev)
        wanted = (lang == "bash" and CURL.search(code) is not None) or (
            lang == "python" and PY_CLIENTS.search(code) is not None)
        if wanted:
            out.append(Example(lang, start + 1, code, (skip.group(1) or "marked") if skip else None))
        i = j + 1
    return out


EXAMPLES = readme_examples(README.read_text(encoding="utf-8"))


RUNNABLE = [e for e in EXAMPLES if e.skip is None]


def test_readme_has_examples() -> None:
    assert len(RUNNABLE) >= 5 and any(e.lang == "bash" for e in RUNNABLE) and any(e.lang == "python" for e in RUNNABLE)
    # examples marked not-for-the-default are not run (no skipped test): each must say why
    for e in EXAMPLES:
        assert e.skip is None or e.skip.strip() not in ("", "marked"), f"README line {e.line}: give the reason"


def _autoglm_shim(bin_dir: Path) -> None:
    """`autoglm` on PATH = this tree's CLI under this interpreter (what `pip install -e .` puts in the venv)."""
    shim = bin_dir / "autoglm"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m autoglm.cli "$@"\n', encoding="utf-8")
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("example", RUNNABLE, ids=[e.id for e in RUNNABLE])
def test_readme_example_runs(example: Example, default_server: ServerProcess, tmp_path: Path) -> None:
    code = example.code.replace("127.0.0.1:8000", f"127.0.0.1:{default_server.port}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _autoglm_shim(bin_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOGLM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", AUTOGLM_HOST="127.0.0.1",
               AUTOGLM_PORT=str(default_server.port), PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    if example.lang == "bash":
        # An HTTP error status fails the example, as it would fail a user reading its output.
        code = re.sub(r"\bcurl ", "curl -sS --fail-with-body ", code)
        argv = ["bash", "-euo", "pipefail", "-c", code]
    else:
        argv = [sys.executable, "-c", code]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT)
    report = f"README line {example.line} exited {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n" \
             f"--- stderr\n{done.stderr[-3000:]}"
    print(report)
    assert done.returncode == 0, report
    assert done.stdout.strip(), report
