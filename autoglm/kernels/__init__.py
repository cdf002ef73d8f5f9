"""Compute kernels behind one interface (`base.Kernels`), chosen once per model and passed in.

`select_kernels(device, cpu_isa)` is the one place that decides: the fused CPU kernels (`cpu/`) when the weights are
on CPU and the extension builds, else the torch reference (`reference.REFERENCE`). `AUTOGLM_GGUF_KERNELS=0` picks
the reference; it is read at each selection, never kept as a process-wide switch. The CPU kernel variant
(`autoglm.kernels.cpu.variants`) is the caller's `cpu_isa` argument: `autoglm --cpu-isa` reaches it as a value
(command config -> `load_model(cpu_isa=...)` -> the loader), never through the environment; without one,
`$AUTOGLM_CPU_ISA` is read at each selection, else the best variant this CPU runs.
"""

from __future__ import annotations

import logging
import os

import torch

from autoglm.kernels.base import Kernels, UsesKernels, bind_kernels
from autoglm.kernels.reference import REFERENCE, TorchKernels

__all__ = [
    "REFERENCE", "Kernels", "TorchKernels", "UsesKernels", "bind_kernels", "kernels_enabled", "kernels_label",
    "select_kernels",
]

log = logging.getLogger("autoglm.kernels")
ENV = "AUTOGLM_GGUF_KERNELS"


def kernels_enabled() -> bool:
    """False when `$AUTOGLM_GGUF_KERNELS` is 0/false/no/off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def select_kernels(device: torch.device | str, cpu_isa: str | None = None) -> Kernels:
    """The kernels for a model whose weights live on `device`: CPU kernels when possible, else the reference.
    cpu_isa: the CPU ISA variant (None: `$AUTOGLM_CPU_ISA`, else the best this CPU runs); one the CPU lacks raises
    CpuIsaError."""
    if torch.device(device).type != "cpu" or not kernels_enabled():
        return REFERENCE
    from autoglm.kernels.cpu import cpu_kernels

    kernels = cpu_kernels(cpu_isa)
    return REFERENCE if kernels is None else kernels


def kernels_label(kernels: Kernels) -> str:
    """How `kernels` are reported (start-up log, /status/data): "cpu avx2" (name and CPU ISA) or "torch"."""
    isa = getattr(kernels, "isa", None)
    return f"{kernels.name} {isa}" if isa else kernels.name
