"""Moved to `autoglm.gguf.quants`; this name stays for tests/unit/test_gguf_{kernels,linear,packed}.py until they
import the new path. Delete after that merge."""

from autoglm.gguf.quants import *  # noqa: F403
from autoglm.gguf.quants import dequantize, quantize  # noqa: F401
