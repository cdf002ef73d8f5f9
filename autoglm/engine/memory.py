"""Memory sizing: how many KV-cache blocks the budget buys, decided once when the engine starts.

The decoder's activation dtype and device are probed once (quantized weights may be uint8, so the embedding is
asked), the bytes of one block are summed over every `Attention` module (K and V), and the block count is the budget
divided by that, capped by what `max_num_seqs` full-length sequences could use and never below one full-length
sequence (so any admissible request can finish, with preemption).
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from autoglm.config import EngineConfig
from autoglm.layers.attention import Attention
from autoglm.models.loaded import LoadedModel

KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class KVCachePlan:
    """The KV cache the runner allocates: `num_blocks` blocks of `block_size` tokens in `cache_dtype`, for a decoder
    whose hidden states are `dtype` on `device`."""

    num_blocks: int
    block_size: int
    dtype: torch.dtype
    device: torch.device
    cache_dtype: torch.dtype
    bytes_per_block: int

    @property
    def bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


def plan_kv_cache(model: LoadedModel, config: EngineConfig, max_model_len: int) -> KVCachePlan:
    """`config.num_kv_blocks` if set, else `config.kv_cache_memory` (or `kv_cache_fraction` of available RAM)."""
    dtype, device = decoder_dtype_device(model)
    cache_dtype = dtype if config.kv_cache_dtype == "auto" else KV_DTYPES[config.kv_cache_dtype]
    per_block = kv_bytes_per_block(model, config.block_size, cache_dtype)
    if config.num_kv_blocks is not None:
        num_blocks = config.num_kv_blocks
    else:
        budget = config.kv_cache_memory or int(psutil.virtual_memory().available * config.kv_cache_fraction)
        num_blocks = plan_num_blocks(
            block_size=config.block_size, bytes_per_block=per_block, max_model_len=max_model_len,
            max_num_seqs=config.max_num_seqs, budget_bytes=budget,
        )
    return KVCachePlan(num_blocks, config.block_size, dtype, device, cache_dtype, per_block)


def plan_num_blocks(
    *,
    block_size: int,
    bytes_per_block: int,
    max_model_len: int,
    max_num_seqs: int,
    budget_bytes: int,
) -> int:
    """Blocks that fit `budget_bytes`, capped by what `max_num_seqs` full-length sequences could use, and at least
    enough for one full-length sequence (so any admissible request can always finish, with preemption)."""
    per_seq = (max_model_len + block_size - 1) // block_size
    fit = budget_bytes // max(bytes_per_block, 1)
    return int(max(per_seq, min(fit, per_seq * max_num_seqs)))


def attention_layers(model: LoadedModel) -> list[Attention]:
    return [m for m in model.decoder.modules() if isinstance(m, Attention)]


def decoder_dtype_device(model: LoadedModel) -> tuple[torch.dtype, torch.device]:
    """dtype/device of the decoder's hidden states (quantized weights may be uint8, so ask the embedding)."""
    with torch.inference_mode():
        probe = model.decoder.embed_tokens(torch.zeros(1, dtype=torch.long, device=_first_device(model)))
    return probe.dtype, probe.device


def _first_device(model: LoadedModel) -> torch.device:
    for p in model.decoder.parameters():
        return p.device
    for b in model.decoder.buffers():
        return b.device
    return torch.device("cpu")


def kv_bytes_per_block(model: LoadedModel, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers (K and V)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return sum(2 * block_size * a.num_kv_heads * a.head_dim * itemsize for a in attention_layers(model))
