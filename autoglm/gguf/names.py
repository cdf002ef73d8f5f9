"""GGUF tensor names <-> our (HF) parameter names.

Names come from the `gguf` package's own tables (`gguf.get_tensor_name_map`, i.e. `gguf.tensor_mapping`): for each
of our parameter names we ask which GGUF name the converter would have written for it, and invert that.
Layout changes (Gemma norms + 1, q/k row orders, ...) belong to each architecture module (`gguf_fixups`,
`gguf_export_fixups` in autoglm/models/<arch>.py), not here.
"""

from __future__ import annotations

from collections.abc import Iterable

import gguf

from autoglm.errors import UnsupportedArchitecture

_ARCH_BY_NAME = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
_SUFFIXES = (".weight", ".bias")


def gguf_names_for(arch: str, n_blocks: int, params: Iterable[str]) -> dict[str, str]:
    """{GGUF tensor name: our parameter name} for `params` of a model of GGUF architecture `arch`."""
    if arch not in _ARCH_BY_NAME:
        raise UnsupportedArchitecture(f"GGUF architecture {arch!r} is unknown to the gguf package")
    tmap = gguf.get_tensor_name_map(_ARCH_BY_NAME[arch], n_blocks)
    out: dict[str, str] = {}
    for p in params:
        g = tmap.get_name(p, try_suffixes=_SUFFIXES)
        if g is None and p.startswith("model.language_model."):  # GLM-4.1V's 5.x prefix
            g = tmap.get_name("model." + p.removeprefix("model.language_model."), try_suffixes=_SUFFIXES)
        if g is not None:
            out[g] = p
    return out
