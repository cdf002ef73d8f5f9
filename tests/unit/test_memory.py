"""KV-cache sizing by default: min(max_num_seqs x context, kv_cache_tokens, 25% of available RAM), at least the given
context; `kv_cache_memory` and `num_kv_blocks` still override. The served context follows the pool."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoglm.config import EngineConfig
from autoglm.engine.engine import Engine
from autoglm.engine.memory import MIN_DEFAULT_CONTEXT, default_kv_tokens, kv_bytes_per_block, plan_kv_cache
from autoglm.loader import load_model
from autoglm.models.loaded import LoadedModel


def _tokens(**kw: object) -> int:
    args = {"bytes_per_token": 1000, "max_model_len": 32768, "context_given": False, "max_num_seqs": 16,
            "pool_tokens": 16384, "ram_bytes": 10**12, **kw}
    return default_kv_tokens(**args)[0]  # type: ignore[arg-type]


def test_default_rule() -> None:
    assert _tokens() == 16384  # the pool bounds a long-context model
    assert _tokens(max_model_len=512, max_num_seqs=4) == 2048  # every slot at full length is enough
    assert _tokens(ram_bytes=4000 * 1000) == 4000  # a quarter of the free RAM bounds it
    assert _tokens(ram_bytes=10 * 1000) == MIN_DEFAULT_CONTEXT  # ... but never below a usable context
    assert _tokens(context_given=True) == 32768  # a context asked for always fits one sequence
    text = default_kv_tokens(bytes_per_token=1000, max_model_len=32768, context_given=False, max_num_seqs=16,
                             pool_tokens=16384, ram_bytes=10**12)[1]
    assert "max_num_seqs 16" in text and "context 32768" in text and "kv_cache_tokens 16384" in text


@pytest.fixture(scope="module")
def model(tiny_glm4_dir: Path) -> LoadedModel:
    return load_model(tiny_glm4_dir)


def test_engine_context_follows_the_default_pool(model: LoadedModel) -> None:
    ctx = model.max_model_len
    pool = max(ctx // 2, 64)
    engine = Engine(model, EngineConfig(block_size=16, kv_cache_tokens=pool))
    assert engine.kv.capacity_tokens == max(pool, min(ctx, MIN_DEFAULT_CONTEXT))
    assert engine.max_model_len == min(ctx, engine.kv.capacity_tokens)
    assert "default: min(" in engine.kv_cache_rule
    per_token = kv_bytes_per_block(model, 16, next(model.decoder.parameters()).dtype) // 16
    assert engine.kv_cache_bytes == engine.kv.capacity_tokens * per_token


def test_overrides(model: LoadedModel) -> None:
    ctx = model.max_model_len
    given = Engine(model, EngineConfig(block_size=16, kv_cache_tokens=16, max_model_len=ctx))
    assert given.max_model_len == ctx  # --max-model-len is honoured over the pool
    per_block = kv_bytes_per_block(model, 16, next(model.decoder.parameters()).dtype)
    mem = plan_kv_cache(model, EngineConfig(block_size=16, kv_cache_memory=per_block * 10_000), ctx)
    assert mem.num_blocks == min(10_000, 16 * (-(-ctx // 16)))  # --kv-cache-memory: its own budget
    assert "--kv-cache-memory" in mem.rule
    assert plan_kv_cache(model, EngineConfig(num_kv_blocks=7), ctx).num_blocks == 7
