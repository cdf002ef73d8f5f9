"""KV block bookkeeping: allocation, growth, freeing, slots, budget planning."""

from __future__ import annotations

import pytest

from autoglm.engine.kv_cache import KVCacheManager, block_hash, slot_mapping
from autoglm.engine.memory import plan_num_blocks
from autoglm.errors import InvalidRequest


def test_allocate_grow_free() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a: list[int] = []
    b: list[int] = []
    assert kv.can_allocate(a, 9)
    kv.allocate(a, 9)  # 3 blocks
    assert len(a) == 3 and kv.num_free_blocks == 3
    kv.allocate(a, 12)  # still 3
    assert len(a) == 3
    kv.allocate(a, 13)
    assert len(a) == 4 and kv.num_free_blocks == 2
    assert not kv.can_allocate(b, 9)
    kv.allocate(b, 8)
    assert kv.num_free_blocks == 0 and not set(a) & set(b)
    kv.free(a)
    assert a == [] and kv.num_free_blocks == 4
    kv.free(b)
    assert kv.num_free_blocks == 6 and kv.num_used_blocks == 0


def test_slot_mapping() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    table: list[int] = []
    kv.allocate(table, 4)
    other: list[int] = []
    kv.allocate(other, 4)
    kv.allocate(table, 6)
    assert slot_mapping(table, 0, 6, kv.block_size) == [
        table[0] * 4, table[0] * 4 + 1, table[0] * 4 + 2, table[0] * 4 + 3, table[1] * 4, table[1] * 4 + 1
    ]


def test_over_allocation_is_a_bug_not_a_silent_overwrite() -> None:
    kv = KVCacheManager(num_blocks=1, block_size=4)
    with pytest.raises(RuntimeError):
        kv.allocate([], 5)
    with pytest.raises(InvalidRequest):
        KVCacheManager(0, 4)


def test_block_hash_chains_prefix_and_media() -> None:
    h1 = block_hash(None, [1, 2, 3, 4])
    assert h1 == block_hash(None, [1, 2, 3, 4])
    assert block_hash(h1, [5]) != block_hash(None, [5])
    assert block_hash(None, [9, 9], ["img-a"]) != block_hash(None, [9, 9], ["img-b"])


def test_plan_num_blocks() -> None:
    # budget for 100 blocks, capped by 2 sequences of 64 tokens (2 * 4 blocks)
    assert plan_num_blocks(block_size=16, bytes_per_block=10, max_model_len=64, max_num_seqs=2, budget_bytes=1000) == 8
    # tiny budget: still one full-length sequence
    assert plan_num_blocks(block_size=16, bytes_per_block=10, max_model_len=64, max_num_seqs=2, budget_bytes=5) == 4
    assert plan_num_blocks(block_size=16, bytes_per_block=10, max_model_len=64, max_num_seqs=9, budget_bytes=60) == 6
