"""Build a C++ extension once per machine, with every wait bounded and a visible message.

`build_extension(spec)` returns the imported extension module:
1. `<cache>/kernels/<name>_<key>/<name>.so` exists (key = sources, flags, torch, Python, CPU flags
   or, for fixed-arch variants, the architecture) -> import it.
2. Else take the directory's build lock: an `fcntl.flock` on `lock`, which the kernel releases when its holder dies
   (Ctrl-C, kill -9, a killed container), so a dead builder can never block anyone. The holder writes its pid and
   start time into the file and empties it when done; a non-empty file found by the next holder means the last
   build was interrupted: the lock is taken over with a log line naming the dead pid.
   Waiting for a live builder is bounded (`timeout`); after it the caller gets `KernelBuildError` (and falls back).
3. The holder logs "compiling CPU kernels (first run, ~N s)" and compiles in a child process (bounded by `timeout`,
   its output kept for the error message) into a private temp directory, then renames the finished `.so` into place
   (atomic on one file system) — concurrent starters either see no file or a complete one. No torch FileBaton is
   shared between processes (the child's build directory is its own).
A failure raises `KernelBuildError` saying why (compiler output tail, timeout, lock); `autoglm.kernels.select`
turns that into a warning and the reference ops.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from autoglm.errors import KernelBuildError

log = logging.getLogger("autoglm.kernels")

DEFAULT_TIMEOUT_S = 900.0  # a first build of the GGUF kernels takes ~1-4 min on 2 busy cores
TIMEOUT_ENV = "AUTOGLM_KERNEL_BUILD_TIMEOUT"
_FIRST_ESTIMATE_S = 60  # shown before any build on this machine has been timed
PROGRESS_S = 30.0  # seconds between "N of M sources compiled" lines during a build
_POLL_S = 0.2


@dataclass(frozen=True)
class ExtensionSpec:
    """What to compile: a torch C++ extension named `name` (its PYBIND11_MODULE uses TORCH_EXTENSION_NAME)."""

    name: str
    sources: tuple[Path, ...]
    headers: tuple[Path, ...] = ()  # hashed into the key, not compiled
    cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    label: str = "CPU kernels"  # for log lines
    extra_key: tuple[str, ...] = field(default_factory=tuple)
    # key by this CPU's flags (for -march=native code); False: by the architecture only (fixed -march flags)
    cpu_keyed: bool = True

    def key(self) -> str:
        import torch

        h = hashlib.sha256()
        for f in (*self.sources, *self.headers):
            h.update(f.name.encode())
            h.update(f.read_bytes())
        for part in (
            torch.__version__,
            sys.version,
            " ".join(self.cflags),
            " ".join(self.ldflags),
            _cpu_key() if self.cpu_keyed else platform.machine(),
            *self.extra_key,
        ):
            h.update(part.encode())
        return h.hexdigest()[:16]


def _cpu_key() -> str:
    # -march=native code must not be reused on another CPU: key the build by the CPU's flags
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_root() -> Path:
    """`<autoglm cache>/kernels` (`$XDG_CACHE_HOME/autoglm`, else `~/.cache/autoglm`)."""
    from autoglm.builtins import cache_dir

    return cache_dir() / "kernels"


def build_timeout() -> float:
    """Seconds one build (and one wait for another process's build) may take: `$AUTOGLM_KERNEL_BUILD_TIMEOUT`."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        log.warning("ignoring %s=%r (not a number); using %.0f s", TIMEOUT_ENV, raw, DEFAULT_TIMEOUT_S)
        return DEFAULT_TIMEOUT_S


def build_extension(spec: ExtensionSpec, *, root: Path | None = None, timeout: float | None = None) -> ModuleType:
    """The compiled extension of `spec`, built on first use (see the module docstring); raises KernelBuildError."""
    timeout = build_timeout() if timeout is None else timeout
    directory = (root or default_root()) / f"{spec.name}_{spec.key()}"
    target = directory / f"{spec.name}.so"
    if target.is_file():
        return _import(spec.name, target)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KernelBuildError(f"cannot create the kernel cache {directory}: {e}") from e
    with _build_lock(directory / "lock", timeout, spec.label):
        if not target.is_file():  # else another process built it while we waited
            _compile(spec, directory, target, timeout)
    return _import(spec.name, target)


def _import(name: str, path: Path) -> ModuleType:
    import torch  # noqa: F401  (the extension links against libtorch: load it first)

    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise KernelBuildError(f"{path}: not an importable extension")
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as e:  # e.g. built against another torch, or a truncated file from an old scheme
        raise KernelBuildError(f"{path}: cannot import the built kernels ({e}); delete the file to rebuild") from e
    return module


@contextlib.contextmanager
def _build_lock(path: Path, timeout: float, label: str) -> Iterator[None]:
    """Hold `path`'s flock for the block; wait at most `timeout` s for a live holder, take over a dead one's."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_holder(fd)
                if time.monotonic() >= deadline:
                    raise KernelBuildError(
                        f"{label}: another process ({_describe(holder)}) is still building into {path.parent} "
                        f"after {timeout:.0f} s (set {TIMEOUT_ENV} to wait longer)"
                    ) from None
                if not announced:
                    log.warning(
                        "%s: waiting up to %.0f s for %s, which is compiling them", label, timeout, _describe(holder)
                    )
                    announced = True
                time.sleep(_POLL_S)
        stale = _read_holder(fd)
        if stale:
            # its holder is gone (the kernel dropped its flock) without emptying the file: it was interrupted
            log.warning(
                "%s: breaking a stale build lock %s left by %s (not running any more); rebuilding",
                label,
                path,
                _describe(stale),
            )
        _write_holder(fd, {"pid": os.getpid(), "host": platform.node(), "started": time.time()})
        try:
            yield
        finally:
            _write_holder(fd, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict[str, object] | None:
    try:
        raw = os.pread(fd, 4096, 0)
    except OSError:
        return None
    if not raw.strip():
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return {"pid": "?", "raw": raw[:80].decode(errors="replace")}  # foreign or torn content
    return info if isinstance(info, dict) else {"pid": "?", "raw": str(info)[:80]}


def _write_holder(fd: int, info: dict[str, object] | None) -> None:
    os.ftruncate(fd, 0)
    if info is not None:
        os.pwrite(fd, json.dumps(info).encode(), 0)
    os.fsync(fd)


def _describe(holder: dict[str, object] | None) -> str:
    if not holder:
        return "an unknown process"
    started = holder.get("started")
    since = f", started {time.time() - float(started):.0f} s ago" if isinstance(started, int | float) else ""
    host = holder.get("host")
    return f"pid {holder.get('pid')}" + (f" on {host}" if host and host != platform.node() else "") + since


def _estimate(timing: Path) -> int:
    try:
        return max(1, round(float(timing.read_text())))
    except (OSError, ValueError):
        return _FIRST_ESTIMATE_S


def _compile(spec: ExtensionSpec, directory: Path, target: Path, timeout: float) -> None:
    for old in directory.glob("build-*"):  # we hold the lock: these are interrupted builds' leftovers
        shutil.rmtree(old, ignore_errors=True)
    timing = directory.parent / f"{spec.name}.seconds"  # the last build's duration on this machine
    source_kb = sum(Path(src).stat().st_size for src in spec.sources) / 1e3
    log.warning("compiling %s (first run, ~%d s): %d C++ sources, %.0f kB, into %s", spec.label, _estimate(timing),
                len(spec.sources), source_kb, directory)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=directory))
    try:
        job = {
            "name": spec.name,
            "sources": [str(s) for s in spec.sources],
            "cflags": list(spec.cflags),
            "ldflags": list(spec.ldflags),
            "build_directory": str(tmp),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "autoglm.kernels.cpu.build", json.dumps(job)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": _package_root() + os.pathsep + os.environ.get("PYTHONPATH", "")},
        )
        out, err = _wait_with_progress(proc, spec, tmp, started + timeout, started)
        built = tmp / f"{spec.name}.so"
        if proc.returncode != 0 or not built.is_file():
            tail = (err or out or "").strip().splitlines()[-12:]
            raise KernelBuildError(
                f"compiling {spec.label} failed (exit {proc.returncode}): " + " | ".join(tail)[-2000:]
            )
        os.replace(built, target)  # atomic: readers see no file or the whole one
        seconds = time.monotonic() - started
        with contextlib.suppress(OSError):
            timing.write_text(f"{seconds:.1f}")
        log.warning("compiled %s in %.1f s", spec.label, seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_with_progress(
    proc: subprocess.Popen[str], spec: ExtensionSpec, tmp: Path, deadline: float, started: float
) -> tuple[str, str]:
    """Wait for the build child until `deadline`, logging every PROGRESS_S how many sources have an object file
    (a multi-minute silent compile looks like a hang). Kills the child and raises KernelBuildError past the deadline."""
    while True:
        left = deadline - time.monotonic()
        try:
            return proc.communicate(timeout=max(0.05, min(PROGRESS_S, left)))
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                proc.kill()
                proc.communicate()
                raise KernelBuildError(
                    f"compiling {spec.label} took longer than {deadline - started:.0f} s ({TIMEOUT_ENV})"
                ) from None
            done = len(list(tmp.glob("*.o")))
            log.warning("compiling %s: %d of %d sources compiled, %.0f s so far", spec.label, done,
                        len(spec.sources), time.monotonic() - started)


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[3])  # the directory holding the `autoglm` package


def _child(job: dict[str, object]) -> None:
    """Runs in the build child: compile with torch's cpp_extension into a directory no other process uses."""
    from torch.utils.cpp_extension import load

    load(
        name=str(job["name"]),
        sources=[str(s) for s in job["sources"]],  # type: ignore[union-attr]
        extra_cflags=[str(f) for f in job["cflags"]],  # type: ignore[union-attr]
        extra_ldflags=[str(f) for f in job["ldflags"]],  # type: ignore[union-attr]
        build_directory=str(job["build_directory"]),
        verbose=False,
    )


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
