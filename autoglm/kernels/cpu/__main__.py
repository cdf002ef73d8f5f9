"""`python -m autoglm.kernels.cpu`: build the CPU kernels now (e.g. in a launcher's set-up step or a Dockerfile), so
the first `autoglm serve` / `LLM(...)` does not compile. Exit status 0 when they are ready, 1 when they cannot be
built (the warning says why; autoglm then runs on the torch reference ops)."""

from __future__ import annotations

import logging
import sys

from autoglm.kernels.cpu import extension, kernels_spec
from autoglm.kernels.cpu.build import default_root


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ext = extension()
    if ext is None:
        return 1
    spec = kernels_spec()
    print(f"CPU kernels ready: {default_root() / f'{spec.name}_{spec.key()}'} (vnni={bool(ext.has_vnni())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
