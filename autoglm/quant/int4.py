"""Moved to `autoglm.layers.linear.int4`; this alias keeps the offline writers' imports working until they move."""

from autoglm.layers.linear.int4 import (
    DEFAULT_GROUP_SIZE,
    GROUP_SIZES,
    Int4Linear,
    dequantize_int4,
    quantize_int4,
    unpack_nibbles,
)

__all__ = ["DEFAULT_GROUP_SIZE", "GROUP_SIZES", "Int4Linear", "dequantize_int4", "quantize_int4", "unpack_nibbles"]
