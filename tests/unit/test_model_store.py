"""The model store: manifests by digest (no copies), names and tags, copy / delete / list, the lock's bound, and
concurrent creates and deletes from several processes never leaving a broken manifest."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from autoglm.errors import InvalidRequest, ModelNotFound
from autoglm.store.modelfile import ModelfileError
from autoglm.store.store import ModelStore, StoreBusy, sha256_file, split_name, store_root

MODELFILE = '''FROM ./models/m.gguf
TEMPLATE """{{ if .System }}<|system|> {{ .System }}<|end|> {{ end }}<|user|> {{ .Prompt }}<|end|> <|assistant|> """
PARAMETER temperature 0.5
PARAMETER num_ctx 2048
'''


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 64)
    return tmp_path


def test_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGLM_STORE", str(tmp_path / "a"))
    assert store_root() == tmp_path / "a"
    monkeypatch.delenv("AUTOGLM_STORE")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert store_root() == tmp_path / "xdg" / "autoglm"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert store_root() == tmp_path / "home" / ".local" / "share" / "autoglm"


def test_names() -> None:
    assert split_name("autoglm-phone-9b") == ("autoglm-phone-9b", "latest")
    assert split_name("Me/GLM:q4") == ("me/glm", "q4")
    for bad in ("", "../x", "a b", "x:", ":t"):
        with pytest.raises(InvalidRequest):
            split_name(bad)


def test_create_records_path_digest_size_without_copying(workdir: Path) -> None:
    store = ModelStore(workdir / "store")
    m = store.create_from_modelfile("glm", MODELFILE, base_dir=workdir)
    gguf = workdir / "models" / "m.gguf"
    assert m.name == "glm:latest"
    assert m.source.path == str(gguf.resolve()) and m.source.size == gguf.stat().st_size
    assert m.source.digest == sha256_file(gguf)
    assert m.parameters == {"temperature": 0.5, "num_ctx": 2048}
    assert not (workdir / "store" / "blobs").exists()  # nothing copied
    saved = json.loads((workdir / "store" / "manifests" / "glm" / "latest.json").read_text())
    assert saved["source"]["digest"] == m.source.digest
    assert store.get("glm:latest") == m


def test_from_store_model_inherits(workdir: Path) -> None:
    store = ModelStore(workdir / "store")
    store.create_from_modelfile("glm", MODELFILE, base_dir=workdir)
    child = store.create_from_modelfile("agent:v1", "FROM glm\nSYSTEM Be brief.\nPARAMETER temperature 0\n")
    assert child.source == store.get("glm").source
    assert child.template == store.get("glm").template
    assert child.parameters == {"temperature": 0.0, "num_ctx": 2048} and child.system == "Be brief."


def test_from_hf_directory(tmp_path: Path) -> None:
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "glm4v"}')
    (model / "model.safetensors").write_bytes(b"\0" * 1000)
    store = ModelStore(tmp_path / "store")
    m = store.create_from_modelfile("glm", "FROM ./hf\nPARAMETER num_ctx 4096\n", base_dir=tmp_path)
    assert m.source.kind == "hf" and m.source.path == str(model.resolve())
    assert m.source.size == 1000 + (model / "config.json").stat().st_size
    (model / "model.safetensors").write_bytes(b"\1" * 1000)  # other bytes, other digest
    assert store.create("glm2", from_=str(model)).source.digest != m.source.digest
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelfileError, match="has no config.json"):
        store.create("x", from_=str(tmp_path / "empty"))


def test_copy_delete_list(workdir: Path) -> None:
    store = ModelStore(workdir / "store")
    store.create_from_modelfile("glm", MODELFILE, base_dir=workdir)
    store.copy("glm", "other/glm:v2")
    assert [m.name for m in store.list()] == ["glm:latest", "other/glm:v2"]
    store.delete("glm")
    assert [m.name for m in store.list()] == ["other/glm:v2"]
    with pytest.raises(ModelNotFound, match="model 'glm:latest' not found"):
        store.delete("glm")
    with pytest.raises(ModelNotFound):
        store.copy("nope", "x")


def test_create_errors(workdir: Path) -> None:
    store = ModelStore(workdir / "store")
    with pytest.raises(ModelfileError, match=r"Modelfile line 1: FROM './models/missing.gguf': no such file"):
        store.create_from_modelfile("x", "FROM ./models/missing.gguf\n", base_dir=workdir)
    (workdir / "notgguf.bin").write_bytes(b"nope")
    with pytest.raises(ModelfileError, match="is not a GGUF file"):
        store.create_from_modelfile("x", "FROM ./notgguf.bin\n", base_dir=workdir)
    broken = MODELFILE.replace("{{ end }}", "")
    with pytest.raises(ModelfileError) as info:
        store.create_from_modelfile("x", broken, base_dir=workdir)
    assert info.value.message == "Modelfile line 2: TEMPLATE: template error: template: :1: unexpected EOF"
    assert store.list() == []


def test_uploaded_blob(workdir: Path) -> None:
    store = ModelStore(workdir / "store")
    data = (workdir / "models" / "m.gguf").read_bytes()
    digest = sha256_file(workdir / "models" / "m.gguf")
    store.add_blob(digest, iter([data[:100], data[100:]]))
    m = store.create("b", from_=digest)
    assert m.source.digest == digest and Path(m.source.path).read_bytes() == data
    with pytest.raises(InvalidRequest, match="digest mismatch"):
        store.add_blob("sha256:" + "0" * 64, iter([b"x"]))
    store.delete("b")
    assert not Path(m.source.path).exists()  # unreferenced uploads are collected


def test_lock_wait_is_bounded(workdir: Path) -> None:
    from filelock import FileLock

    root = workdir / "store"
    root.mkdir()
    with FileLock(str(root / ".lock")):
        store = ModelStore(root, lock_timeout=0.2)
        with pytest.raises(StoreBusy, match="locked by another process"):
            store.create_from_modelfile("x", MODELFILE, base_dir=workdir)


def _worker(root: str, workdir: str, k: int) -> None:
    store = ModelStore(root, lock_timeout=60)
    for i in range(12):
        name = f"m{(k + i) % 4}:t{i % 3}"
        if i % 3 == 2:
            try:
                store.delete(name)
            except ModelNotFound:
                pass
        else:
            store.create_from_modelfile(name, MODELFILE, base_dir=workdir)
        for m in store.list():  # readers never see half a manifest
            assert m.source.size > 0


def test_concurrent_creates_and_deletes(workdir: Path) -> None:
    root = workdir / "store"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(root), str(workdir), k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    manifests = list((root / "manifests").rglob("*.json"))
    for path in manifests:
        data = json.loads(path.read_text())  # every file left is a whole manifest
        assert data["name"] == f"{path.parent.name}:{path.stem}"
    assert not [p for p in root.rglob("*.tmp")]  # no temporary files left behind
    assert len(ModelStore(root).list()) == len(manifests)
    assert os.listdir(root / "manifests")
