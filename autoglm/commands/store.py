"""Model store commands (Ollama's verbs): `create NAME -f Modelfile`, `list`, `show NAME`, `rm NAME...`,
`cp SRC DST`. They work on the local store directly (no server needed); a running server sees the changes at once."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("create", help="create a store model from a Modelfile",
                              description="Create NAME[:TAG] from a Modelfile (FROM a GGUF file, an HF directory or "
                              "a store model; relative paths are relative to the Modelfile's folder).")
    p.add_argument("name")
    p.add_argument("-f", "--file", default="Modelfile", help="the Modelfile [./Modelfile]")
    p.set_defaults(func=_create)

    p = subparsers.add_parser("list", aliases=["ls"], help="list store models")
    p.set_defaults(func=_list)

    p = subparsers.add_parser("show", help="show a store model's Modelfile, template or parameters")
    p.add_argument("name")
    for flag in ("modelfile", "template", "parameters", "system", "license"):
        p.add_argument(f"--{flag}", action="store_true", help=f"print only the {flag}")
    p.set_defaults(func=_show)

    p = subparsers.add_parser("rm", help="remove store models (the files FROM points at stay)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=_rm)

    p = subparsers.add_parser("cp", help="copy a store model to a new name")
    p.add_argument("source")
    p.add_argument("destination")
    p.set_defaults(func=_cp)


def _store() -> Any:
    from autoglm.store.store import ModelStore

    return ModelStore()


def _create(args: argparse.Namespace) -> int:
    from autoglm.errors import InvalidRequest

    path = Path(args.file).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidRequest(f"cannot read the Modelfile {path}: {e.strerror}") from None
    manifest = _store().create_from_modelfile(args.name, text, base_dir=path.resolve().parent)
    print(f"created {manifest.name} (FROM {manifest.source.path}, {manifest.source.digest[:19]})")
    print("success")
    return 0


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _ago(iso: str) -> str:
    try:
        then = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    s = (dt.datetime.now(dt.UTC) - then).total_seconds()
    for unit, scale in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if s >= scale:
            return f"{int(s // scale)} {unit} ago"
    return "just now"


def _list(args: argparse.Namespace) -> int:
    rows = [("NAME", "ID", "SIZE", "MODIFIED")]
    for m in _store().list():
        rows.append((m.name, m.digest.split(":")[-1][:12], _size(m.source.size), _ago(m.created_at)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("    ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _show(args: argparse.Namespace) -> int:
    m = _store().get(args.name)
    if args.modelfile:
        print(m.modelfile, end="")
    elif args.template:
        print(m.template or "")
    elif args.system:
        print(m.system or "")
    elif args.license:
        print("\n".join(m.license))
    elif args.parameters:
        for k, v in m.parameters.items():
            for item in v if isinstance(v, list) else [v]:
                print(f"{k:<30} {item}")
    else:
        print(f"  Model\n    name           {m.name}\n    from           {m.source.path}\n"
              f"    format         {m.source.kind}\n    size           {_size(m.source.size)}\n"
              f"    digest         {m.source.digest}")
        if m.parameters:
            print("\n  Parameters")
            for k, v in m.parameters.items():
                print(f"    {k:<14} {v}")
        if m.system:
            print(f"\n  System\n    {m.system}")
        if m.template is not None:
            print(f"\n  Template\n    {m.template}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    store = _store()
    for name in args.names:
        store.delete(name)
        print(f"deleted '{name}'")
    return 0


def _cp(args: argparse.Namespace) -> int:
    _store().copy(args.source, args.destination)
    print(f"copied '{args.source}' to '{args.destination}'", file=sys.stdout)
    return 0
