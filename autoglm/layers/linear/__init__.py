"""Linear layers by weight format — dense (`dense.Linear`), GGUF blocks (`gguf`), int8 and int4 weight-only — all
drop-in for `Linear`: same `in_features`/`out_features` and forward, so a model never knows which one it holds."""

from __future__ import annotations

from autoglm.layers.linear.dense import Linear

__all__ = ["Linear"]
