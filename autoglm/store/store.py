"""The local model store: named models (`name:tag`) made from Modelfiles, kept as small JSON manifests.

Layout under the root (`$AUTOGLM_STORE`, else `$XDG_DATA_HOME/autoglm`, else `~/.local/share/autoglm`):
    manifests/<name>/<tag>.json   one model: its FROM (path + sha256 digest + size, never a copy), template,
                                  system, parameters, messages, license, the Modelfile text
    blobs/sha256-<hex>            files uploaded through `/api/blobs` (the only bytes the store holds itself)
    digests.json                  sha256 of FROM files by (path, size, mtime), so re-creating does not re-hash GBs
    .lock                         held while the store changes

Every write is a temporary file + `os.replace` (readers see the old or the new manifest, never half of one), and
create / copy / delete hold the lock, waiting at most `lock_timeout` seconds before raising StoreBusy.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from autoglm.errors import AutoGLMError, InvalidRequest, ModelNotFound
from autoglm.store.modelfile import ModelfileError, parse_modelfile, parse_parameter, render_modelfile

DEFAULT_TAG = "latest"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_CHUNK = 1 << 20


class StoreBusy(AutoGLMError):
    """Another process held the store's lock for longer than the bounded wait."""

    status = 503
    error_type = "service_unavailable"


def store_root() -> Path:
    """$AUTOGLM_STORE > $XDG_DATA_HOME/autoglm > ~/.local/share/autoglm."""
    env = os.environ.get("AUTOGLM_STORE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / "autoglm"


def split_name(name: str) -> tuple[str, str]:
    """`name[:tag]` -> (name, tag); raises InvalidRequest for a name the store cannot hold."""
    raw = (name or "").strip()
    base, tag = raw.rsplit(":", 1) if ":" in raw.split("/")[-1] else (raw, DEFAULT_TAG)
    if not base or not _NAME_RE.fullmatch(base) or ".." in base or not _TAG_RE.fullmatch(tag):
        raise InvalidRequest(f"invalid model name {name!r}: use NAME or NAME:TAG (letters, digits, '.', '_', '-', "
                             "'/' between parts)", param="model")
    return base.lower(), tag


def full_name(name: str) -> str:
    base, tag = split_name(name)
    return f"{base}:{tag}"


@dataclass
class Source:
    """What FROM points at: a GGUF file, an HF directory or an uploaded blob, by path + content digest."""

    kind: str  # "gguf" | "hf"
    path: str
    digest: str  # "sha256:<hex>"
    size: int


@dataclass
class Manifest:
    name: str  # "name:tag"
    source: Source
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    from_: str = ""  # the FROM as written (a path or the parent model's name)
    created_at: str = ""
    digest: str = ""  # sha256 of the manifest's content (Ollama's model digest)

    @property
    def modelfile(self) -> str:
        return render_modelfile(self.source.path, self.parameters, self.template, self.system, self.license,
                                self.messages)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["from"] = d.pop("from_")
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Manifest:
        d = dict(d)
        d["from_"] = d.pop("from", "")
        d["source"] = Source(**d["source"])
        return cls(**d)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat().replace("+00:00", "Z")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class ModelStore:
    """create / copy / delete / list / show over the store at `root` (see the module docstring)."""

    def __init__(self, root: str | Path | None = None, *, lock_timeout: float = 30.0) -> None:
        self.root = Path(root) if root is not None else store_root()
        self.lock_timeout = lock_timeout

    # --- paths & locking ----------------------------------------------------------------------------------------
    def _manifest_path(self, name: str) -> Path:
        base, tag = split_name(name)
        return self.root / "manifests" / base / f"{tag}.json"

    def blob_path(self, digest: str) -> Path:
        m = re.fullmatch(r"sha256[:-]([0-9a-f]{64})", digest or "")
        if not m:
            raise InvalidRequest(f"invalid blob digest {digest!r}: expected sha256:<64 hex digits>", param="digest")
        return self.root / "blobs" / f"sha256-{m.group(1)}"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / ".lock"), timeout=self.lock_timeout)
        try:
            with lock:
                yield
        except Timeout:
            raise StoreBusy(f"the model store {self.root} is locked by another process (waited "
                            f"{self.lock_timeout:g} s); retry, or remove {self.root / '.lock'} if no autoglm "
                            "process is running") from None

    # --- reading ------------------------------------------------------------------------------------------------
    def get(self, name: str) -> Manifest:
        path = self._manifest_path(name)
        try:
            return Manifest.from_json(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ModelNotFound(f"model '{full_name(name)}' not found") from None

    def exists(self, name: str) -> bool:
        try:
            return self._manifest_path(name).is_file()
        except InvalidRequest:
            return False

    def list(self) -> list[Manifest]:
        out = []
        base = self.root / "manifests"
        for path in sorted(base.rglob("*.json")) if base.is_dir() else []:
            try:
                out.append(Manifest.from_json(json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # deleted meanwhile, or not ours
        return out

    # --- writing ------------------------------------------------------------------------------------------------
    def create_from_modelfile(self, name: str, text: str, *, base_dir: str | Path = ".") -> Manifest:
        """Parse a Modelfile (relative FROM paths are relative to `base_dir`, the Modelfile's folder) and create."""
        mf = parse_modelfile(text)
        if mf.template is not None:
            _check_template(mf.template, line=mf.template_line)
        return self.create(name, from_=mf.from_, template=mf.template, system=mf.system,
                           parameters=mf.parameters, messages=mf.messages, license=mf.license, base_dir=base_dir,
                           from_line=mf.from_line)

    def create(self, name: str, *, from_: str, template: str | None = None, system: str | None = None,
               parameters: Mapping[str, Any] | None = None, messages: list[dict[str, str]] | None = None,
               license: list[str] | None = None, base_dir: str | Path = ".", from_line: int = 0) -> Manifest:
        """FROM a GGUF file, an HF directory, an uploaded blob (`sha256:...`) or a model in the store (whose
        template, system, parameters and messages are inherited unless given here)."""
        target = full_name(name)
        params = _typed_parameters(parameters or {})
        if template is not None:
            _check_template(template)
        with self._locked():
            parent: Manifest | None = None
            source = self._resolve_source(from_, Path(base_dir), from_line)
            if source is None:
                try:
                    parent = self.get(from_)
                except (ModelNotFound, InvalidRequest):
                    where = f"FROM {from_!r}"
                    raise ModelfileError(f"{where}: no such file or directory (relative paths are relative to "
                                         f"{Path(base_dir).resolve()}) and no model of that name in the store "
                                         f"{self.root}", line=from_line) from None
                source = parent.source
            manifest = Manifest(
                name=target, source=source,
                template=template if template is not None else (parent.template if parent else None),
                system=system if system is not None else (parent.system if parent else None),
                parameters={**(parent.parameters if parent else {}), **params},
                messages=list(messages) if messages else list(parent.messages if parent else []),
                license=list(license) if license else list(parent.license if parent else []),
                from_=from_, created_at=_now(),
            )
            manifest.digest = _digest(manifest)
            _atomic_write(self._manifest_path(target), json.dumps(manifest.to_json(), indent=1))
        return manifest

    def copy(self, source: str, destination: str) -> Manifest:
        with self._locked():
            manifest = self.get(source)
            manifest.name = full_name(destination)
            manifest.created_at = _now()
            _atomic_write(self._manifest_path(destination), json.dumps(manifest.to_json(), indent=1))
        return manifest

    def delete(self, name: str) -> None:
        with self._locked():
            path = self._manifest_path(name)
            try:
                path.unlink()
            except FileNotFoundError:
                raise ModelNotFound(f"model '{full_name(name)}' not found") from None
            for parent in path.parents:  # drop empty name folders up to manifests/
                if parent == self.root / "manifests":
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break
            self._collect_blobs()

    def add_blob(self, digest: str, chunks: Iterator[bytes]) -> Path:
        """Store bytes as blobs/sha256-<hex>, verifying the digest (the one copy the store makes)."""
        path = self.blob_path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.adopt_blob(digest, Path(tmp))

    def adopt_blob(self, digest: str, tmp: Path) -> Path:
        """Move an uploaded file (written in blobs/) into place as blobs/sha256-<hex> after checking its digest."""
        path = self.blob_path(digest)
        try:
            got = sha256_file(tmp)
            if got.split(":")[1] != path.name.split("-")[1]:
                raise InvalidRequest(f"digest mismatch: the upload hashes to {got}, not {digest}", param="digest")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    # --- internals ----------------------------------------------------------------------------------------------
    def _resolve_source(self, from_: str, base_dir: Path, line: int) -> Source | None:
        """A FROM that names a file / directory / blob -> Source; None when it may be a model name."""
        if re.fullmatch(r"sha256[:-][0-9a-f]{64}", from_):
            path = self.blob_path(from_)
            if not path.is_file():
                raise ModelfileError(f"FROM {from_}: no such blob in the store (upload it to /api/blobs first)",
                                     line=line)
            return Source("gguf", str(path), "sha256:" + path.name.split("-")[1], path.stat().st_size)
        p = Path(from_).expanduser()
        if not p.is_absolute():
            p = base_dir / p
        if p.is_file():
            from autoglm.loader import is_gguf

            if not is_gguf(p):
                raise ModelfileError(f"FROM {from_}: {p.resolve()} is not a GGUF file", line=line)
            return Source("gguf", str(p.resolve()), self.file_digest(p.resolve()), p.stat().st_size)
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise ModelfileError(f"FROM {from_}: {p.resolve()} has no config.json (not a Hugging Face model "
                                     "directory)", line=line)
            files = sorted(f for f in p.resolve().rglob("*") if f.is_file() and not f.name.startswith("."))
            h = hashlib.sha256()
            for f in files:
                h.update(f"{f.relative_to(p.resolve())}\0{self.file_digest(f)}\n".encode())
            return Source("hf", str(p.resolve()), "sha256:" + h.hexdigest(), sum(f.stat().st_size for f in files))
        return None

    def file_digest(self, path: Path) -> str:
        """sha256 of a file, cached by (path, size, mtime) in digests.json so multi-GB files are hashed once."""
        cache_path = self.root / "digests.json"
        st = path.stat()
        key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
        try:
            cache = json.loads(cache_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cache = {}
        if key in cache:
            return cache[key]
        digest = sha256_file(path)
        cache = {k: v for k, v in cache.items() if not k.startswith(f"{path}|")}
        cache[key] = digest
        _atomic_write(cache_path, json.dumps(cache, indent=0))
        return digest

    def _collect_blobs(self) -> None:
        """Remove uploaded blobs no manifest refers to (called under the lock)."""
        blobs = self.root / "blobs"
        if not blobs.is_dir():
            return
        used = {Path(m.source.path).name for m in self.list()}
        for blob in blobs.glob("sha256-*"):
            if blob.name not in used:
                blob.unlink(missing_ok=True)


def _typed_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in parameters.items():
        if key.lower() == "stop":
            stops = [value] if isinstance(value, str) else list(value or [])
            out["stop"] = [str(s) for s in stops]
            continue
        typed = parse_parameter(key, value)
        if typed is not None:
            out[key.lower()] = typed
    return out


def _check_template(text: str, *, line: int = 0) -> None:
    from autoglm.tokenizer.go_template_ast import GoTemplateError
    from autoglm.tokenizer.ollama_template import OllamaTemplate

    try:
        OllamaTemplate(text)
    except GoTemplateError as e:
        # Ollama's wording ("template error: template: :1: unexpected EOF"), after the TEMPLATE's line
        raise ModelfileError(f"TEMPLATE: template error: {e.message}" if line else f"template error: {e.message}",
                             line=line) from None


def _digest(m: Manifest) -> str:
    body = m.to_json()
    body.pop("created_at", None)
    body.pop("digest", None)
    body.pop("name", None)
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
