"""Fused C++ kernels for float32 CPU inference: `build` (bounded JIT build), `ops` (`CpuKernels`), `pack`, `csrc/`.

`cpu_kernels()` builds the extension on first use in a process (once per machine: the result is cached on disk)
and returns a `CpuKernels` over it, or None with a warning saying why when it cannot be built.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from autoglm.errors import KernelBuildError
from autoglm.kernels.cpu.build import ExtensionSpec, build_extension

if TYPE_CHECKING:
    from autoglm.kernels.cpu.ops import CpuKernels

log = logging.getLogger("autoglm.kernels")

CSRC = Path(__file__).with_name("csrc")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp")


def kernels_spec() -> ExtensionSpec:
    """The GGUF/decode kernels extension: every `csrc/*.cpp` in one module (kernels.h is their shared header)."""
    return ExtensionSpec(
        name="autoglm_gguf_kernels",
        sources=tuple(sorted(CSRC.glob("*.cpp"))),
        headers=(CSRC / "kernels.h",),
        cflags=FLAGS,
        ldflags=("-fopenmp",),
    )


@functools.cache
def load_extension(spec: ExtensionSpec) -> ModuleType | None:
    """`spec` built and imported (memoized per process: a build result, not a switch), or None — with a warning
    saying why — when it cannot be built."""
    try:
        return build_extension(spec)
    except KernelBuildError as e:
        log.warning("%s unavailable, using the torch reference ops: %s", spec.label, e)
    except Exception as e:  # no compiler / headers / ninja: keep the reference path
        log.warning("%s unavailable (%s: %s), using the torch reference ops", spec.label, type(e).__name__, e)
    return None


def extension() -> ModuleType | None:
    """The GGUF/decode kernels extension, or None when it cannot be built."""
    return load_extension(kernels_spec())


def cpu_kernels() -> CpuKernels | None:
    """A new `CpuKernels` over the built extension (its own scratch buffers), or None when it cannot be built."""
    ext = extension()
    if ext is None:
        return None
    from autoglm.kernels.cpu.ops import CpuKernels

    return CpuKernels(ext)
