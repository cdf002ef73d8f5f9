"""Fused C++ kernels for float32 CPU inference: `build` (bounded JIT build), `variants` (one extension per ISA and
the choice of one), `ops` (`CpuKernels`), `pack`, `csrc/` (torch wrappers) and `csrc/core/` (torch-free compute).

`cpu_kernels(isa)` builds the chosen variant on first use (once per machine: the result is cached on disk, keyed by
the variant and the sources, not by this CPU) and returns a `CpuKernels` over it, or None with a warning saying why
when it cannot be built. An ISA this CPU lacks raises `CpuIsaError` (a configuration error, not a fallback).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from autoglm.errors import KernelBuildError
from autoglm.kernels.cpu import variants
from autoglm.kernels.cpu.build import ExtensionSpec, build_extension

if TYPE_CHECKING:
    from autoglm.kernels.cpu.ops import CpuKernels

log = logging.getLogger("autoglm.kernels")

CSRC = Path(__file__).with_name("csrc")
CORE = CSRC / "core"
FLAGS = ("-O3", "-ffp-contract=off", "-fopenmp")
_NOT_BUILT = ("driver.cpp", "kquant_q8k_driver.cpp")  # torch-free test drivers, not part of the extension


def kernels_spec(isa: str) -> ExtensionSpec:
    """The GGUF/decode kernels extension of variant `isa`: every `csrc/*.cpp` and `csrc/core/*.cpp` in one module."""
    v = variants.variant(isa)
    core = tuple(p for p in sorted(CORE.glob("*.cpp")) if p.name not in _NOT_BUILT)
    return ExtensionSpec(
        name=f"autoglm_gguf_kernels_{v.name}",
        sources=(*sorted(CSRC.glob("*.cpp")), *core),
        headers=(*sorted(CSRC.glob("*.h")), *sorted(CORE.glob("*.h"))),
        cflags=(*FLAGS, *v.cflags, f"-D{v.isa_macro}"),
        ldflags=("-fopenmp",),
        label=f"CPU kernels ({v.name})",
        cpu_keyed=False,  # fixed -march per variant: any CPU of this architecture with its features can reuse it
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


def extension(isa: str | None = None) -> ModuleType | None:
    """The kernels extension of the chosen variant (`variants.resolve`), or None when it cannot be built."""
    return load_extension(kernels_spec(variants.resolve(isa)))


def cpu_kernels(isa: str | None = None) -> CpuKernels | None:
    """A new `CpuKernels` over the chosen variant (its own scratch buffers), or None when it cannot be built.
    Raises CpuIsaError for an unknown ISA or one this CPU lacks."""
    name = variants.resolve(isa)
    ext = load_extension(kernels_spec(name))
    if ext is None:
        return None
    from autoglm.kernels.cpu.ops import CpuKernels

    log.info("CPU kernels: ISA %s (requested %s; this CPU runs %s)", name, variants.requested(isa),
             ", ".join(variants.available()))
    return CpuKernels(ext)
