"""GGUF block formats <-> torch tensors: the one entry point the GGUF loader, converter and `quantize` use.

- `dequantize(raw, qtype, shape, name)`: raw GGUF bytes -> float32 tensor, bit-exact with `gguf.quants`.
- `quantize(tensor, qtype, name)`: float32 -> raw GGUF bytes `[rows, row_bytes]` uint8. Simple types are bit-exact
  with `gguf.quants.quantize`; K-quants follow ggml's reference quantizers (the `gguf` package has none).
- `q4_k_m_type_for(...)`: llama.cpp's Q4_K_M mixture (which tensors get Q6_K), `QuantMix` for whole models.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType, LlamaFileType
from torch import Tensor

from autoglm.errors import UnsupportedQuantType
from autoglm.gguf.blocks import (
    ENCODERS,
    SUPPORTED_TYPES,
    as_byte_tensor,
    block_layout,
    dequantize,
    dequantize_blocks,
    row_nbytes,
)
from autoglm.gguf.kquants import K_ENCODERS

__all__ = [
    "SUPPORTED_TYPES",
    "QUANTIZABLE_TYPES",
    "QuantMix",
    "as_byte_tensor",
    "block_layout",
    "can_quantize",
    "dequantize",
    "dequantize_blocks",
    "file_type_for",
    "q4_k_m_type_for",
    "quantize",
    "row_nbytes",
]

Q = GGMLQuantizationType

_ALL_ENCODERS = {**ENCODERS, **K_ENCODERS}
QUANTIZABLE_TYPES: tuple[GGMLQuantizationType, ...] = tuple(_ALL_ENCODERS)

# Encode this many elements at a time: the K-quant searches keep ~20 temporaries of the chunk's size alive.
_CHUNK_ELEMENTS = 1 << 20


def can_quantize(n_cols: int, qtype: GGMLQuantizationType) -> bool:
    """Whether a row of `n_cols` elements is a whole number of `qtype` blocks."""
    return n_cols % block_layout(qtype)[0] == 0


def quantize(tensor: Tensor | np.ndarray, qtype: GGMLQuantizationType | int, name: str = "<tensor>") -> np.ndarray:
    """float tensor [..., n_cols] -> GGUF bytes [..., row_bytes] uint8 (what `GGUFWriter.add_tensor(raw_dtype=)`
    takes). Raises `UnsupportedQuantType` naming the tensor for a type we cannot write or a row that is not a whole
    number of blocks."""
    try:
        qt = Q(int(qtype))
    except ValueError:
        raise UnsupportedQuantType(f"tensor {name!r}: unknown GGML type id {int(qtype)}") from None
    enc = _ALL_ENCODERS.get(qt)
    if enc is None:
        supported = ", ".join(t.name for t in QUANTIZABLE_TYPES)
        raise UnsupportedQuantType(f"tensor {name!r}: cannot quantize to {qt.name} (supported: {supported})")
    x = torch.as_tensor(np.asarray(tensor) if not isinstance(tensor, Tensor) else tensor).detach()
    x = x.to(device="cpu", dtype=torch.float32).contiguous()
    shape = tuple(x.shape) or (1,)
    rb = row_nbytes(qt, shape[-1], name)
    bs, ts = block_layout(qt)
    blocks = x.reshape(-1, bs)
    out = torch.empty(blocks.shape[0], ts, dtype=torch.uint8)
    step = max(1, _CHUNK_ELEMENTS // bs)
    for s in range(0, blocks.shape[0], step):
        out[s : s + step] = enc(blocks[s : s + step])
    return out.numpy().reshape(*shape[:-1], rb)


# --- llama.cpp's Q4_K_M mixture ----------------------------------------------------------------------------------
def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    # llama.cpp: the first and last eighth of the layers, and every third one in between, get more bits
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _fallback(qtype: GGMLQuantizationType, n_cols: int | None) -> GGMLQuantizationType:
    # rows that are not whole 256-element super-blocks fall back like llama.cpp's tensor_type_fallback
    if n_cols is None or can_quantize(n_cols, qtype):
        return qtype
    alt = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}.get(qtype, qtype)
    return alt if can_quantize(n_cols, alt) else Q.F16


def q4_k_m_type_for(
    tensor_name: str,
    layer_index: int | None,
    n_layers: int,
    *,
    n_cols: int | None = None,
    tied_embeddings: bool = False,
) -> GGMLQuantizationType:
    """The type llama.cpp's Q4_K_M gives a quantizable 2-D weight (GGUF tensor names, e.g. `blk.3.attn_v.weight`).

    output.weight (or token_embd.weight when the output is tied to it) -> Q6_K (Q8_0 if its rows are not whole
    super-blocks); attn_v / attn_qkv and ffn_down -> Q6_K in the `use_more_bits` layers; everything else Q4_K.
    With `n_cols`, types whose block does not divide the row fall back as llama.cpp does (Q4_K -> Q5_0, ...).
    Norms, biases and 1-D tensors are not quantized at all: callers keep them F32 (see `is_quantizable`).
    """
    if tensor_name == "output.weight" or (tied_embeddings and tensor_name == "token_embd.weight"):
        if n_cols is not None and not can_quantize(n_cols, Q.Q6_K):
            return Q.Q8_0
        return Q.Q6_K
    qtype = Q.Q4_K
    if layer_index is not None and any(k in tensor_name for k in ("attn_v.weight", "attn_qkv.weight", "ffn_down")):
        if _use_more_bits(layer_index, n_layers):
            qtype = Q.Q6_K
    return _fallback(qtype, n_cols)


_LAYER = re.compile(r"(?:^|\.)blk\.(\d+)\.")


def layer_of(tensor_name: str) -> int | None:
    """`blk.N.` -> N (None for tensors outside the layer stack)."""
    m = _LAYER.search(tensor_name)
    return int(m.group(1)) if m else None


def is_quantizable(tensor_name: str, shape: Sequence[int]) -> bool:
    """llama.cpp's rule: only 2-D+ tensors whose name ends in `weight`, never norms or position embeddings."""
    if len(shape) < 2 or not tensor_name.endswith("weight"):
        return False
    return not any(k in tensor_name for k in ("_norm.weight", "ffn_gate_inp.weight", ".position_embd", "patch_embd"))


@dataclass(frozen=True)
class QuantMix:
    """A whole-model target: one type for every quantizable weight, or llama.cpp's Q4_K_M mixture."""

    name: str  # "q8_0", "q4_k_m", "f16", ...
    base: GGMLQuantizationType
    file_type: LlamaFileType
    mixed: bool = False  # True: Q4_K_M rules per tensor

    def type_for(
        self, tensor_name: str, shape: Sequence[int], n_layers: int, tied_embeddings: bool = False
    ) -> GGMLQuantizationType:
        """Type for one tensor; `shape` in torch order ([rows, n_cols]). Non-quantizable tensors -> F32."""
        if not is_quantizable(tensor_name, shape):
            return Q.F32
        n_cols = int(shape[-1])
        if self.mixed:
            return q4_k_m_type_for(
                tensor_name, layer_of(tensor_name), n_layers, n_cols=n_cols, tied_embeddings=tied_embeddings
            )
        return _fallback(self.base, n_cols)

    @classmethod
    def parse(cls, name: str) -> QuantMix:
        key = name.lower()
        if key not in _MIXES:
            raise UnsupportedQuantType(f"quantization type {name!r} is not supported (choose from {', '.join(_MIXES)})")
        return _MIXES[key]


_MIXES: dict[str, QuantMix] = {
    "f32": QuantMix("f32", Q.F32, LlamaFileType.ALL_F32),
    "f16": QuantMix("f16", Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": QuantMix("bf16", Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": QuantMix("q8_0", Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": QuantMix("q4_0", Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": QuantMix("q4_1", Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q5_0": QuantMix("q5_0", Q.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q5_1": QuantMix("q5_1", Q.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q2_k": QuantMix("q2_k", Q.Q2_K, LlamaFileType.MOSTLY_Q2_K),
    "q3_k": QuantMix("q3_k", Q.Q3_K, LlamaFileType.MOSTLY_Q3_K_S),
    "q4_k": QuantMix("q4_k", Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    "q5_k": QuantMix("q5_k", Q.Q5_K, LlamaFileType.MOSTLY_Q5_K_S),
    "q6_k": QuantMix("q6_k", Q.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "q4_k_m": QuantMix("q4_k_m", Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_M, mixed=True),
}


def file_type_for(name: str) -> LlamaFileType:
    """`general.file_type` value for a target name ("q4_k_m" -> MOSTLY_Q4_K_M)."""
    return QuantMix.parse(name).file_type
