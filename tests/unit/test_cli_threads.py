"""The CLI frame: `--threads N` / AUTOGLM_THREADS set torch's CPU threads before a command runs (all cores by default
for compute commands), and `autoglm --help` does not import torch (command modules keep heavy imports inside run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from autoglm import cli

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "numpy", "gguf", "tqdm", "transformers", "safetensors", "tokenizers", "fastapi", "uvicorn")


def _autoglm(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autoglm.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, check=False)  # fmt: skip


@pytest.fixture()
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_flag_in_a_subprocess(tiny_gemma3_gguf: Path) -> None:
    out = _autoglm("--threads", "1", "inspect", str(tiny_gemma3_gguf), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)  # inspect ran and printed its JSON
    # the value reaches torch before the command: a one-liner command module is overkill, so ask torch directly
    probe = subprocess.run(
        [sys.executable, "-c", "import torch, sys; from autoglm.cli import main; "
         "main(['--threads', '1', 'plan', sys.argv[1], '--json', '-']); print('THREADS', torch.get_num_threads())",
         str(tiny_gemma3_gguf)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().splitlines()[-1] == "THREADS 1"
    bad = _autoglm("--threads", "0", "inspect", str(tiny_gemma3_gguf))
    assert bad.returncode == 2 and "--threads must be a positive integer" in bad.stderr


def test_threads_precedence_flag_env_default(
    tiny_gemma3_gguf: Path, monkeypatch: pytest.MonkeyPatch, restore_threads: None, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = ["plan", str(tiny_gemma3_gguf), "--json", "-"]
    monkeypatch.setenv("AUTOGLM_THREADS", "3")
    assert cli.main(plan) == 0 and torch.get_num_threads() == 3  # env
    assert cli.main(["--threads", "1", *plan]) == 0 and torch.get_num_threads() == 1  # flag beats env
    monkeypatch.setenv("AUTOGLM_THREADS", "many")
    assert cli.main(plan) == 1
    assert "AUTOGLM_THREADS must be a positive integer" in capsys.readouterr().err
    monkeypatch.delenv("AUTOGLM_THREADS")
    torch.set_num_threads(1)
    assert cli.main(plan) == 0 and torch.get_num_threads() == 1  # light command, no flag: torch left alone
    assert cli.resolve_threads(None, "serve") == cli.available_cores()  # compute commands: all cores
    assert cli.resolve_threads(None, "chat") == cli.resolve_threads(None, "bench") == cli.available_cores()
    assert cli.resolve_threads(None, "inspect") is None


def test_bench_threads_flag_and_global_flag_coexist() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["--threads", "2", "bench", "m.gguf"])
    assert args.global_threads == 2 and args.threads is None  # the subcommand's default does not clobber it
    args = parser.parse_args(["bench", "m.gguf", "--threads", "3"])
    assert args.threads == 3 and args.global_threads is None
    for command in ("serve", "chat"):
        assert parser.parse_args(["--threads", "4", command]).global_threads == 4


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom autoglm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "--threads" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_torch_free_mirrors_match_their_sources() -> None:
    from autoglm.commands import convert, quantize
    from autoglm.gguf.writer import OUTTYPES
    from autoglm.quant.apply import MODES

    assert convert.OUTTYPES == OUTTYPES
    assert quantize.HF_TYPES == MODES


def test_frame_flags_also_after_the_command() -> None:
    """`autoglm serve --cpu-isa avx2 --threads 3` parses as `autoglm --cpu-isa avx2 --threads 3 serve`; a flag given
    at neither place keeps the frame's default, and a command's own `--threads` (bench) stays its own."""
    parser = cli.build_parser()
    after = parser.parse_args(["serve", "--cpu-isa", "avx2", "--threads", "3"])
    before = parser.parse_args(["--cpu-isa", "avx2", "--threads", "3", "serve"])
    assert (after.cpu_isa, after.global_threads) == (before.cpu_isa, before.global_threads) == ("avx2", 3)
    plan = parser.parse_args(["plan", "autoglm-phone-9b", "--log-level", "INFO"])
    assert plan.log_level == "INFO"
    # serve's own --log-level (the server's, default info) stays its own, as bench's --threads
    serve = parser.parse_args(["serve", "--log-level", "debug"])
    assert serve.serve_log_level == "debug" and serve.log_level == parser.get_default("log_level")
    plain = parser.parse_args(["serve"])
    assert plain.cpu_isa is None and plain.global_threads is None
    assert parser.parse_args(["--cpu-isa", "scalar", "serve"]).cpu_isa == "scalar"  # not reset by the command
    bench = parser.parse_args(["bench", "m.gguf", "--threads", "2", "--cpu-isa", "avx2"])
    assert bench.threads == 2 and bench.global_threads is None and bench.cpu_isa == "avx2"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--cpu-isa", "bogus"])
