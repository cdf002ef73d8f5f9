"""Qwen3 (dense): the LLaMA decoder with a per-head RMSNorm on q and k before RoPE (`autoglm.models.llama`).

HF `Qwen3Attention`: `attention_bias` (default false) biases q/k/v/o like Llama's; `head_dim` is explicit. GGUF
(`qwen3`) keeps HF's q/k row order (NeoX RoPE in llama.cpp) and names the norms `attn_q_norm` / `attn_k_norm`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from autoglm.errors import ConfigError
from autoglm.models.llama import LlamaArgs, LlamaForCausalLM
from autoglm.models.qwen2 import gguf_export_fixups, gguf_fixups  # noqa: F401  (same GGUF layout as qwen2: none)

if TYPE_CHECKING:
    from autoglm.gguf.reader import GGUFFile


class Qwen3ForCausalLM(LlamaForCausalLM):
    """HF `Qwen3ForCausalLM`: Llama's modules plus `self_attn.q_norm` / `self_attn.k_norm`."""


def from_hf(config: dict[str, Any], *, no_vision: bool = False) -> Qwen3ForCausalLM:
    if config.get("use_sliding_window"):
        raise ConfigError(
            "use_sliding_window=true (per-layer sliding window) is not supported", param="use_sliding_window"
        )
    args = LlamaArgs.from_hf({**config, "use_sliding_window": False})
    args.qk_norm = True
    return Qwen3ForCausalLM(args)


def from_gguf(f: GGUFFile) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(LlamaArgs.from_gguf(f))


def hf_config(model: nn.Module) -> dict[str, Any]:
    out = model.config.to_hf("Qwen3ForCausalLM")  # type: ignore[union-attr,operator]
    return {**out, "model_type": "qwen3", "use_sliding_window": False, "sliding_window": None}


GGUF_ARCH = "qwen3"
