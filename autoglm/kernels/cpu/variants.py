"""The CPU kernel variants, one torch extension per ISA, and the choice of one: feature detection and the knob.

Variants (each compiled from the same `csrc/` with its own flags, never `-march=native`, so a cache or wheel built
here works on any CPU of the same architecture that has the variant's features):
- `avx512`: x86-64-v4 + AVX512-VNNI (the file-order GEMV of `csrc/core/` plus the packed layout's vpdpbusd tiles,
  `csrc/packed_tiles_avx512.h`; AVX-512 attention);
- `avxvnni`: x86-64-v3 + AVX-VNNI (Intel 12th gen+ and other CPUs with the VEX `vpdpbusd` but no AVX-512): the
  avx2 sources (family `avx2`) with each u8 x s8 dot a `vpdpbusd ymm` (`__AVXVNNI__` in `csrc/packed_tiles_avx2.h`,
  `csrc/core/isa_avx2.h`); same integers, so bitwise equal to avx2 and avx512;
- `avx2`: x86-64-v3 (AVX2 + FMA + F16C: vpmaddubsw/vpmaddwd int8 dots, file order and the same packed layout in two
  8-row halves, `csrc/packed_tiles_avx2.h`, bitwise equal to avx512's packed output);
- `scalar`: the architecture's baseline (x86-64 or armv8-a), portable C++;
- `neon`: ARM64 with dotprod (its primitives: `csrc/core/isa_neon.h`).
Every variant's file-order GEMV is bitwise equal to `scalar` (`csrc/core/README.md`); `scalar` and `neon` do not
pack (`CpuKernels.can_pack` is False there).

The choice: `isa` argument (`autoglm --cpu-isa` arrives as this argument, passed down by the loader's `cpu_isa`),
else `$AUTOGLM_CPU_ISA` (`auto|avx512|avxvnni|avx2|scalar|neon`, read at each call, never kept or written as a
process-wide switch), `auto` = the best variant this CPU runs. Asking for one the CPU lacks raises `CpuIsaError`
naming what is missing.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

from autoglm.errors import CpuIsaError

ENV = "AUTOGLM_CPU_ISA"
CHOICES = ("auto", "avx512", "avxvnni", "avx2", "scalar", "neon")


@dataclass(frozen=True)
class Variant:
    name: str
    machines: tuple[str, ...]  # platform.machine() values it builds for
    cflags: tuple[str, ...]  # arch flags (the ISA macro is added by the build)
    requires: tuple[str, ...]  # /proc/cpuinfo flags ("flags" on x86, "Features" on ARM) the CPU must list
    family: str = ""  # the sources' ISA macro (AUTOGLM_ISA_<FAMILY>) when it is not the name's: avxvnni is avx2 code

    @property
    def isa_macro(self) -> str:
        return f"AUTOGLM_ISA_{(self.family or self.name).upper()}"


_X86 = ("x86_64", "AMD64")
_ARM = ("aarch64", "arm64")
# best first: `auto` takes the first one the CPU runs
VARIANTS: tuple[Variant, ...] = (
    Variant("avx512", _X86, ("-march=x86-64-v4", "-mavx512vnni", "-mtune=generic"),
            ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx2", "fma", "f16c")),
    Variant("avxvnni", _X86, ("-march=x86-64-v3", "-mavxvnni", "-mtune=generic"),
            ("avx2", "fma", "f16c", "bmi2", "movbe", "avx_vnni"), family="avx2"),
    Variant("avx2", _X86, ("-march=x86-64-v3", "-mtune=generic"), ("avx2", "fma", "f16c", "bmi2", "movbe")),
    Variant("neon", _ARM, ("-march=armv8.2-a+dotprod",), ("asimd", "asimddp")),
    Variant("scalar", (*_X86, *_ARM), (), ()),
)
_BY_NAME = {v.name: v for v in VARIANTS}


def machine() -> str:
    return platform.machine()


@functools.cache
def cpu_features() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (a fact about this machine, read once)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def variant(name: str) -> Variant:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise CpuIsaError(f"unknown CPU ISA {name!r} ({ENV} / --cpu-isa); choose one of {', '.join(CHOICES)}") from None


def missing(v: Variant, features: frozenset[str] | None = None, arch: str | None = None) -> list[str]:
    """What this CPU lacks to run `v` (empty: it runs)."""
    arch = arch or machine()
    if arch not in v.machines:
        return [f"a {'/'.join(v.machines[:1])} CPU (this one is {arch})"]
    have = cpu_features() if features is None else features
    return [f for f in v.requires if f not in have]


def available() -> tuple[str, ...]:
    """The variants this CPU runs, best first."""
    return tuple(v.name for v in VARIANTS if not missing(v))


def requested(isa: str | None = None) -> str:
    """`isa`, else `$AUTOGLM_CPU_ISA`, else "auto" (lower-cased, validated)."""
    import os

    raw = (isa if isa is not None else os.environ.get(ENV, "")).strip().lower() or "auto"
    if raw not in CHOICES:
        raise CpuIsaError(f"unknown CPU ISA {raw!r} ({ENV} / --cpu-isa); choose one of {', '.join(CHOICES)}")
    return raw


def resolve(isa: str | None = None) -> str:
    """The variant to use: the requested one (CpuIsaError when this CPU lacks it) or, for auto, the best one."""
    name = requested(isa)
    if name == "auto":
        return available()[0]
    lack = missing(variant(name))
    if lack:
        raise CpuIsaError(
            f"CPU ISA {name!r} was asked for ({ENV} / --cpu-isa) but this CPU lacks {', '.join(lack)}; "
            f"it runs: {', '.join(available())}"
        )
    return name
