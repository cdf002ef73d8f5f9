"""Moved to `autoglm.layers.linear.int8`; this alias keeps the offline writers' imports working until they move."""

from autoglm.layers.linear.int8 import PACKED_MAX_ROWS, Int8Linear, quantize_int8

__all__ = ["PACKED_MAX_ROWS", "Int8Linear", "quantize_int8"]
