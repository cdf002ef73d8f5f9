"""Memory sizing: how many KV-cache blocks the budget buys, decided once when the engine starts.

The decoder's activation dtype and device are probed once (quantized weights may be uint8, so the embedding is
asked) and the bytes of one block are summed over every `Attention` module (K and V). Then, in order:
- `num_kv_blocks`: exactly that many blocks (tests, benchmarks);
- `kv_cache_memory`: the blocks that budget buys, capped by what `max_num_seqs` full-length sequences could use and
  never below one full-length sequence (so any admissible request can finish, with preemption);
- the default rule: tokens = min(max_num_seqs x context, kv_cache_tokens (16384), kv_cache_fraction (25%) of the
  available RAM), and at least the context when `max_model_len` was given (else at least min(context, 2048)); the
  context the engine then serves is min(the model's context, those tokens). Blocks are shared by all sequences (paged,
  with preemption), like llama.cpp's `n_ctx` shared by its slots: the default server of a 0.3-0.5B model holds a
  few hundred MB of KV cache, not a fraction of the machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from autoglm.config import EngineConfig
from autoglm.layers.attention import Attention
from autoglm.models.loaded import LoadedModel

KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_DEFAULT_CONTEXT = 2048  # the default rule never shrinks the context below this (unless the model's is shorter)


@dataclass(frozen=True)
class KVCachePlan:
    """The KV cache the runner allocates: `num_blocks` blocks of `block_size` tokens in `cache_dtype`, for a decoder
    whose hidden states are `dtype` on `device`. `rule`: how the size was chosen, for the startup log."""

    num_blocks: int
    block_size: int
    dtype: torch.dtype
    device: torch.device
    cache_dtype: torch.dtype
    bytes_per_block: int
    rule: str = ""

    @property
    def bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


def plan_kv_cache(model: LoadedModel, config: EngineConfig, max_model_len: int) -> KVCachePlan:
    """`config.num_kv_blocks` if set, else `config.kv_cache_memory`, else the default rule (module docstring)."""
    dtype, device = decoder_dtype_device(model)
    cache_dtype = dtype if config.kv_cache_dtype == "auto" else KV_DTYPES[config.kv_cache_dtype]
    per_block = kv_bytes_per_block(model, config.block_size, cache_dtype)
    if config.num_kv_blocks is not None:
        num_blocks, rule = config.num_kv_blocks, f"num_kv_blocks={config.num_kv_blocks}"
    elif config.kv_cache_memory:
        num_blocks = plan_num_blocks(
            block_size=config.block_size, bytes_per_block=per_block, max_model_len=max_model_len,
            max_num_seqs=config.max_num_seqs, budget_bytes=config.kv_cache_memory,
        )
        rule = f"--kv-cache-memory {_mib(config.kv_cache_memory)}"
    else:
        available = psutil.virtual_memory().available
        tokens, rule = default_kv_tokens(
            bytes_per_token=per_block // config.block_size, max_model_len=max_model_len,
            context_given=config.max_model_len is not None, max_num_seqs=config.max_num_seqs,
            pool_tokens=config.kv_cache_tokens, ram_bytes=int(available * config.kv_cache_fraction),
            fraction=config.kv_cache_fraction,
        )
        num_blocks = -(-tokens // config.block_size)
    plan = KVCachePlan(num_blocks, config.block_size, dtype, device, cache_dtype, per_block)
    return KVCachePlan(**{**plan.__dict__, "rule": f"{num_blocks * config.block_size} tokens x "
                          f"{per_block // config.block_size} B = {_mib(plan.bytes)} ({rule})"})


def default_kv_tokens(
    *,
    bytes_per_token: int,
    max_model_len: int,
    context_given: bool,
    max_num_seqs: int,
    pool_tokens: int,
    ram_bytes: int,
    fraction: float = 0.25,
) -> tuple[int, str]:
    """The default rule -> (KV tokens, the rule with its numbers). `max_model_len`: the context asked for (the
    model's when not `context_given`)."""
    by_ram = ram_bytes // max(bytes_per_token, 1)
    tokens = min(max_num_seqs * max_model_len, pool_tokens, by_ram)
    floor = max_model_len if context_given else min(max_model_len, MIN_DEFAULT_CONTEXT)
    rule = (f"default: min(max_num_seqs {max_num_seqs} x context {max_model_len}, kv_cache_tokens {pool_tokens}, "
            f"{fraction:.0%} of available RAM = {by_ram} tokens)")
    if tokens < floor:
        rule += f", raised to {'the given' if context_given else 'the smallest default'} context {floor}"
    return max(tokens, floor), rule


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


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"
