"""autoglm: offline inference for AutoGLM-Phone-class (GLM-4.1V) models. Public API: LLM, SamplingParams."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from autoglm.engine.sampling_params import SamplingParams
    from autoglm.llm import LLM


def __getattr__(name: str) -> Any:
    # Lazy so that `import autoglm` (e.g. for the CLI's --help) does not import torch.
    if name == "LLM":
        from autoglm.llm import LLM

        return LLM
    if name == "SamplingParams":
        from autoglm.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
