"""`python -m autoglm.kernels.cpu [--isa NAME | --all]`: build the CPU kernels now (e.g. in a launcher's set-up
step or a Dockerfile), so the first `autoglm serve` / `LLM(...)` does not compile. Default: the variant this CPU
would use (`AUTOGLM_CPU_ISA`, else the best); `--all`: every variant this architecture builds (a cache or image
copied to another CPU of the same architecture then has its variant too). Exit status 0 when they are ready, 1 when
one cannot be built (the warning says why; autoglm then runs on the torch reference ops)."""

from __future__ import annotations

import argparse
import logging
import sys

from autoglm.kernels.cpu import kernels_spec, load_extension, variants
from autoglm.kernels.cpu.build import default_root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autoglm.kernels.cpu")
    p.add_argument("--isa", choices=variants.CHOICES, default=None)
    p.add_argument("--all", action="store_true", help="every variant of this architecture")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.all:
        names = [v.name for v in variants.VARIANTS if variants.machine() in v.machines]
    else:
        names = [variants.resolve(args.isa)]
    status = 0
    for name in names:
        spec = kernels_spec(name)
        ext = load_extension(spec)
        if ext is None:
            status = 1
            continue
        runs = "runs here" if not variants.missing(variants.variant(name)) else "does not run on this CPU"
        print(f"CPU kernels ready: {name} ({runs}): {default_root() / f'{spec.name}_{spec.key()}'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
