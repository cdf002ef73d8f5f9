"""`autoglm chat` / `autoglm inspect` as real subprocesses on the tiny fixtures; the CLI frame in-process."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoglm import cli
from autoglm.commands.chat import TerminalPrinter
from autoglm.commands.inspect import describe
from autoglm.llm import LLM
from autoglm.loader import load_model
from tests.fixtures.gguf import rewrite_gguf

REPO = Path(__file__).resolve().parents[2]


def _autoglm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "autoglm.cli", *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO, input=stdin,
    )


def test_chat_streams_the_same_reply_as_the_api(tiny_glm4v_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    img = tmp_path / "screen.png"
    Image.new("RGB", (70, 100), (200, 30, 90)).save(img)
    proc = _autoglm("chat", str(tiny_glm4v_dir), "Open Chrome", "--image", str(img), "--system", "Be brief.",
                    "--max-tokens", "12", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    llm = LLM(tiny_glm4v_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(img)}},
                                     {"type": "text", "text": "Open Chrome"}]},
    ]
    buf = io.StringIO()
    printer = TerminalPrinter(buf.write, tty=False)
    for d in llm.stream(messages, max_tokens=12, temperature=0.0):
        printer.delta(d.reasoning, d.text)
        usage = d.usage
    printer.end()
    assert proc.stdout == buf.getvalue()
    assert usage is not None and f"{usage['prompt_tokens']} prompt + 12 completion tokens" in proc.stderr


def test_printer_labels_and_dims_reasoning() -> None:
    buf = io.StringIO()
    p = TerminalPrinter(buf.write, tty=False)
    p.delta("let me ", "")
    p.delta("think", "")
    p.delta("", "answer")
    p.end()
    assert buf.getvalue() == "[thinking] let me think\nanswer\n"
    buf = io.StringIO()
    p = TerminalPrinter(buf.write, tty=True)
    p.delta("hmm", "")
    p.delta("", "ok")
    p.end()
    assert buf.getvalue() == "\x1b[2mhmm\x1b[0m\nok\n"


def test_raw_completion_from_stdin(tiny_glm4_dir: Path) -> None:
    proc = _autoglm("chat", "-m", str(tiny_glm4_dir), "-", "--raw", "--max-tokens", "5", "--temperature", "0",
                    stdin="The quick brown fox")
    assert proc.returncode == 0, proc.stderr
    ref = LLM(tiny_glm4_dir).generate("The quick brown fox", max_tokens=5, temperature=0.0)
    assert proc.stdout == ref.text + "\n"


def test_inspect_json_and_table(tiny_glm4v_dir: Path) -> None:
    proc = _autoglm("inspect", str(tiny_glm4v_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    want = describe(load_model(tiny_glm4v_dir))
    for row in (*got["modules"], *want["modules"]):
        row.pop("load_seconds")
    assert got == want
    assert got["architecture"] == "Glm4vForConditionalGeneration" and got["encoders"] == ["image"]
    assert [m["name"] for m in got["modules"]] == ["decoder", "vision"]
    assert all(m["parameters"] > 0 and m["bytes"] == 4 * m["parameters"] for m in got["modules"])  # float32
    table = _autoglm("inspect", str(tiny_glm4v_dir))
    assert table.returncode == 0
    for m in got["modules"]:
        assert f"{m['parameters']:,}" in table.stdout
    assert "Glm4vForConditionalGeneration" in table.stdout and "float32" in table.stdout


def test_bad_model_path_is_a_clean_error(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"NOPE" + b"\0" * 64)  # a .gguf name but not the GGUF magic
    proc = _autoglm("inspect", str(bogus))
    assert proc.returncode == 1
    assert "not a GGUF file" in proc.stderr and "Traceback" not in proc.stderr


def test_frame_skips_missing_command_modules(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "COMMANDS", ("chat", "inspect", "no_such_command_yet"))
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "chat" in out and "inspect" in out and "no_such_command_yet" not in out
    assert cli.main([]) == 2  # no command: help, usage exit code


def test_hostile_files_and_outputs_are_one_line_errors(tiny_glm4_gguf: Path, tiny_glm4_dir: Path,
                                                       tmp_path: Path) -> None:
    """Each is `autoglm CMD: error: ...` with exit 1: no traceback, no partial output, the input untouched."""
    import shutil

    import gguf

    U32, STR = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING
    cases = [
        (rewrite_gguf(tiny_glm4_gguf, tmp_path / "a0.gguf", {"general.alignment": (0, U32)}), "power of two"),
        (rewrite_gguf(tiny_glm4_gguf, tmp_path / "a3.gguf", {"general.alignment": (3, U32)}), "power of two"),
        (rewrite_gguf(tiny_glm4_gguf, tmp_path / "bs.gguf", {"glm4.block_count": ("two", STR)}), "error:"),
        (rewrite_gguf(tiny_glm4_gguf, tmp_path / "b9.gguf", {"glm4.block_count": (10**9, U32)}),
         "glm4.block_count is 1000000000, but the file holds tensors for"),  # was a hang building 10**9 layers
    ]
    for path, cause in cases:
        proc = _autoglm("inspect", str(path))
        assert proc.returncode == 1 and cause in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    for path, cause in ((cases[0][0], "power of two"), (cases[2][0], "glm4.block_count is 'two', not a count")):
        proc = _autoglm("plan", str(path))  # `plan` reads the header with the same reader
        assert proc.returncode == 1 and cause in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # quantize: OUT a directory, or in a missing one; nothing left behind
    for out, cause in ((tmp_path, "is a directory"), (tmp_path / "nope" / "x.gguf", "does not exist")):
        proc = _autoglm("quantize", str(tiny_glm4_gguf), str(out), "q8_0")
        assert proc.returncode == 1 and cause in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("*.part"))
    # convert: an output inside the checkpoint would overwrite what it reads
    ckpt = shutil.copytree(tiny_glm4_dir, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    proc = _autoglm("convert", str(ckpt), "-o", str(ckpt / "model.safetensors"), "--no-progress")
    assert proc.returncode == 1 and "existing file inside the input checkpoint" in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == before
    proc = _autoglm("convert", str(ckpt), "-o", str(tmp_path / "t.gguf"), "--mmproj-out", str(tmp_path / "m.gguf"),
                    "--no-progress")
    assert proc.returncode == 1 and "no vision tower" in proc.stderr and not (tmp_path / "t.gguf").exists()
    # a config claiming a million layers: an error naming both counts (building them on meta hung)
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = 10**6
    (ckpt / "config.json").write_text(json.dumps(config))
    proc = _autoglm("inspect", str(ckpt))
    assert proc.returncode == 1 and "num_hidden_layers is 1000000, but the weights hold" in proc.stderr, proc.stderr
