"""Moved to `autoglm.gguf.blocks`; this name stays until `autoglm.quant.gguf_linear` (layers/linear/gguf.py) imports
the new path. Delete after that merge."""

from autoglm.gguf.blocks import *  # noqa: F403
from autoglm.gguf.blocks import as_byte_tensor, block_layout, check_type, dequantize_blocks, row_nbytes  # noqa: F401
