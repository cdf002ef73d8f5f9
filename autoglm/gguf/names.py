"""GGUF tensor names <-> our (HF) parameter names, and the layout changes llama.cpp's converter makes.

Names come from the `gguf` package's own tables (`gguf.get_tensor_name_map`, i.e. `gguf.tensor_mapping`): for each
of our parameter names we ask which GGUF name the converter would have written for it, and invert that.
Layout changes undone here (read from llama.cpp's convert_hf_to_gguf.py):
- gemma3: every `*norm.weight` is stored as HF weight + 1 (Gemma's RMSNorm multiplies by 1 + w).
- glm4 with M-RoPE (GLM-4.1V text, `rope.dimension_sections`): q/k weights and biases are permuted per head from
  interleaved ("normal") to NeoX rotary order in the first `rope.dimension_count` dims; we permute back.
- glm4 `ffn_up` is HF's fused `gate_up_proj` as is (gate first), no split.
"""

from __future__ import annotations

from collections.abc import Iterable

import gguf
import numpy as np
import torch
from torch import Tensor

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


def neox_to_interleaved_rows(t: Tensor, head_dim: int, rotary_dim: int) -> Tensor:
    """Undo llama.cpp's `normal_to_neox` on the output rows of a q/k weight [H*hd, ...] or bias [H*hd].

    Per head, the converter stored rotary dims as (evens, odds); we put them back interleaved. Works on raw GGUF
    block rows too (a row of blocks moves as a unit), so quantized weights are permuted without decoding.
    """
    rows = t.shape[0]
    idx = interleave_index(rows // head_dim, head_dim, rotary_dim)
    return t.index_select(0, idx)


def interleave_index(n_heads: int, head_dim: int, rotary_dim: int) -> Tensor:
    """Row gather index: new row r of each head takes stored row idx[r]."""
    half = rotary_dim // 2
    per_head = np.arange(head_dim)
    per_head[0:rotary_dim:2] = np.arange(half)  # even dims came first
    per_head[1:rotary_dim:2] = half + np.arange(half)  # then the odd ones
    idx = (np.arange(n_heads)[:, None] * head_dim + per_head[None, :]).reshape(-1)
    return torch.from_numpy(idx)
