"""`autoglm models`: the built-in models (autoglm.builtins) with kind, size, licence and whether they are assembled."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the built-in models and whether they are assembled",
        description="List the built-in models (shipped in pinned PyPI packages, verified by sha256): kind, size, "
        "licence, and whether they are assembled in the cache (and where). Pass a name to `--model`/`serve`.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def rows() -> list[dict[str, Any]]:
    """One `asset_status` dict per built-in, in table order (stat calls only: nothing is hashed or assembled)."""
    from autoglm.builtins import BUILTINS, asset_status

    return [asset_status(asset) for asset in BUILTINS]


def format_table(items: list[dict[str, Any]]) -> str:
    header = ("NAME", "KIND", "SIZE", "LICENCE", "ASSEMBLED")
    body = [
        (
            r["name"] + (" (default)" if r["default"] else ""),
            r["kind"],
            f"{r['size'] / 1e6:.1f} MB",
            r["license"],
            r["path"] if r["assembled"] else "no (assembled on first use)",
        )
        for r in items
    ]
    table = (header, *body)
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = ["  ".join(row[i].ljust(w) for i, w in enumerate(widths)) + "  " + row[-1] for row in table]
    lines.append("")
    lines.append("Upstream models:")
    for r in items:
        missing = "" if r["loadable"] else f" [this build lacks the {r['architecture']!r} architecture]"
        lines.append(f"  {r['name']}: {r['upstream']}; packages {', '.join(r['packages'])}{missing}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    items = rows()
    if args.json:
        json.dump(items, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(format_table(items))
    return 0
