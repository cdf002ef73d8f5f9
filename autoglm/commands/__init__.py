"""CLI subcommands: each module exposes `register(subparsers)`, which adds its parser and sets `func(args) -> int`.

`autoglm.cli` lists the command modules in one table and imports them at start-up; keep their top-level imports
light (no torch) so `autoglm --help` stays fast — import heavy things inside `func`.
"""
