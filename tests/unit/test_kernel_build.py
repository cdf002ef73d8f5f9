"""The kernel build never waits without a bound: interrupted builds, concurrent first starts, stale and live locks.

Each case builds a tiny pybind11 extension through the production `build_extension` (the same lock, child compile
and atomic rename as the GGUF kernels; only the source differs, so a case costs seconds, not minutes) into a fresh
cache (`XDG_CACHE_HOME`, which `autoglm.builtins.cache_dir()` reads) in separate processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoglm.errors import KernelBuildError
from autoglm.kernels.cpu import load_extension
from autoglm.kernels.cpu.build import ExtensionSpec, build_extension, default_root

REPO = Path(__file__).resolve().parents[2]
NAME = "autoglm_tiny_test_ext"
SOURCE = """
#include <pybind11/pybind11.h>
static int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""
CHILD = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from autoglm.kernels.cpu.build import ExtensionSpec, build_extension
spec = ExtensionSpec(name=sys.argv[2], sources=(Path(sys.argv[1]),), label="test kernels")
print(build_extension(spec, timeout=float(sys.argv[3])).answer(), flush=True)
"""
BOUND_S = 600.0  # generous: the machine is shared; a case normally takes seconds


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "autoglm" / "kernels"


def _source(tmp_path: Path, text: str = SOURCE, name: str = "tiny.cpp") -> Path:
    src = tmp_path / name
    src.write_text(text)
    return src


def _spec(src: Path, name: str = NAME) -> ExtensionSpec:
    return ExtensionSpec(name=name, sources=(src,), label="test kernels")


def _start(src: Path, name: str = NAME) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(src), name, str(BOUND_S)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, so the test can clean up the compile it leaves behind
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=BOUND_S + 60)
    return proc.returncode, out, err


def _lock_of(cache: Path, src: Path) -> Path:
    return cache / f"{NAME}_{_spec(src).key()}" / "lock"


def test_three_concurrent_first_starts_all_work_and_compile_once(tmp_path: Path, cache: Path) -> None:
    src = _source(tmp_path)
    procs = [_start(src) for _ in range(3)]
    results = [_finish(p) for p in procs]
    for rc, out, err in results:
        assert rc == 0 and out.strip() == "42", err
    logs = "".join(err for _, _, err in results)
    assert logs.count("compiling test kernels (first run, ~") == 1, logs  # one built, the others waited and loaded
    built = list(cache.glob(f"{NAME}_*/{NAME}.so"))
    assert len(built) == 1 and not list(cache.glob(f"{NAME}_*/build-*"))  # no temp build dirs left behind


def test_killed_mid_build_then_started_again_works(tmp_path: Path, cache: Path) -> None:
    src = _source(tmp_path)
    lock = _lock_of(cache, src)
    victim = _start(src)
    try:
        deadline = time.monotonic() + BOUND_S
        while str(victim.pid) not in (lock.read_text() if lock.exists() else ""):  # it holds the lock: compiling
            assert victim.poll() is None, victim.communicate()
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.02)
        os.kill(victim.pid, signal.SIGKILL)  # kill -9 the process mid-build (its compile child is orphaned)
        victim.wait(timeout=60)
        assert not list(cache.glob(f"{NAME}_*/{NAME}.so"))  # it died before anything was put in place
        rc, out, err = _finish(_start(src))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(victim.pid, signal.SIGKILL)  # the orphaned compile, if still running
    assert rc == 0 and out.strip() == "42", err
    assert "breaking a stale build lock" in err and f"pid {victim.pid}" in err, err
    assert lock.read_text() == ""  # released cleanly this time


def test_stale_lock_files_are_broken_with_a_log_line(
    tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = _source(tmp_path)
    lock = _lock_of(cache, src)
    lock.parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": time.time() - 3600}))
    with caplog.at_level(logging.WARNING, logger="autoglm.kernels"):
        module = build_extension(_spec(src), timeout=BOUND_S)
    assert module.answer() == 42
    assert f"breaking a stale build lock {lock} left by pid {dead.pid}" in caplog.text
    assert "compiling test kernels (first run, ~" in caplog.text
    assert default_root() == cache


def test_zero_byte_and_foreign_lock_files_do_not_block(tmp_path: Path, cache: Path) -> None:
    # what an interrupted torch FileBaton left (a 0-byte `lock`), or garbage: no holder holds its flock
    src = _source(tmp_path)
    lock = _lock_of(cache, src)
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"")
    assert build_extension(_spec(src), timeout=BOUND_S).answer() == 42
    (lock.parent / f"{NAME}.so").unlink()
    lock.write_bytes(b"\x00garbage")
    assert build_extension(_spec(src), timeout=BOUND_S).answer() == 42


def test_a_live_holder_is_waited_for_with_a_bound(tmp_path: Path, cache: Path) -> None:
    src = _source(tmp_path)
    lock = _lock_of(cache, src)
    lock.parent.mkdir(parents=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a live builder that never finishes
        os.write(fd, json.dumps({"pid": os.getpid(), "started": time.time()}).encode())
        started = time.monotonic()
        with pytest.raises(KernelBuildError, match=rf"pid {os.getpid()}.*still building.*after 1 s"):
            build_extension(_spec(src), timeout=1.0)
        assert time.monotonic() - started < BOUND_S  # it gave up instead of waiting forever
    finally:
        os.close(fd)


def test_a_failed_build_falls_back_with_a_warning_saying_why(
    tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = _source(tmp_path, "this is not C++;\n", name="broken.cpp")
    spec = _spec(src, name="autoglm_broken_test_ext")
    with caplog.at_level(logging.WARNING, logger="autoglm.kernels"):
        assert load_extension(spec) is None
    assert "test kernels unavailable, using the torch reference ops: compiling test kernels failed" in caplog.text
    assert "error" in caplog.text  # the compiler's own message is in the warning
    lock = cache / f"autoglm_broken_test_ext_{spec.key()}" / "lock"
    assert lock.read_text() == "" and not list(lock.parent.glob("build-*"))  # released, temp dir removed
