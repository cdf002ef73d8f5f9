"""Qwen2 / Qwen2.5 (incl. Coder and Instruct): the LLaMA decoder with q/k/v biases (`autoglm.models.llama`).

HF `Qwen2Attention` always biases q/k/v and never o_proj; the sliding window of the config is unused unless
`use_sliding_window` (not supported here: transformers applies it to only some layers). GGUF (`qwen2`) keeps HF's
q/k row order: llama.cpp runs Qwen2 with NeoX RoPE, so there is no layout fixup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from autoglm.errors import ConfigError
from autoglm.models.llama import LlamaArgs, LlamaForCausalLM

if TYPE_CHECKING:
    from autoglm.gguf.reader import GGUFFile


class Qwen2ForCausalLM(LlamaForCausalLM):
    """HF `Qwen2ForCausalLM`: same modules and names as Llama, q/k/v with bias."""


def args_from_hf(config: dict[str, Any]) -> LlamaArgs:
    if config.get("use_sliding_window"):
        raise ConfigError(
            "use_sliding_window=true (per-layer sliding window) is not supported", param="use_sliding_window"
        )
    args = LlamaArgs.from_hf({**config, "use_sliding_window": False})
    args.qkv_bias, args.o_bias = True, False
    return args


def from_hf(config: dict[str, Any], *, no_vision: bool = False) -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(args_from_hf(config))


def from_gguf(f: GGUFFile) -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(LlamaArgs.from_gguf(f))


def gguf_fixups(model: nn.Module) -> Any:
    return _same


def gguf_export_fixups(model: nn.Module) -> Any:
    return _same


def _same(_name: str, t: Tensor) -> Tensor:
    return t


def hf_config(model: nn.Module) -> dict[str, Any]:
    out = model.config.to_hf("Qwen2ForCausalLM")  # type: ignore[union-attr,operator]
    out.pop("attention_bias")
    return {**out, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": None}


GGUF_ARCH = "qwen2"
