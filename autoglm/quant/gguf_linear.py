"""Moved to `autoglm.layers.linear.gguf`; this alias keeps the loader's and tools' imports working until they move."""

from autoglm.layers.linear.gguf import GGUFBlockFormat, GGUFEmbedding, GGUFLinear, prepare_weights

__all__ = ["GGUFBlockFormat", "GGUFEmbedding", "GGUFLinear", "prepare_weights"]
