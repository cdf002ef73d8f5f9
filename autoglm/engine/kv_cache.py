"""Block-paged KV cache bookkeeping (no tensors): which cache blocks each sequence owns.

The cache is `num_blocks` blocks of `block_size` token slots; a sequence's `block_table` lists its blocks in order, so
token `j` of the sequence lives in slot `block_table[j // block_size] * block_size + j % block_size`. The runner owns
the actual per-layer K/V tensors `[num_blocks, block_size, n_kv, head_dim]`.

Prefix caching (`enable_prefix_caching`): every full block gets a `hash` chaining (previous block's hash, its token
ids, the content hashes of the media whose slots it holds), registered in `hash_to_block`. At admission the scheduler
looks a prompt's full-block hashes up (`match_prefix`) and shares those blocks (ref_count += 1) instead of recomputing
them. A freed block keeps its hash (and stays reusable) until it is handed out for new content.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from autoglm.errors import InvalidRequest


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full (prefix caching)


def block_hash(prev: bytes | None, token_ids: Sequence[int], media_hashes: Sequence[str] = ()) -> bytes:
    """Content key of one full block: depends on everything before it (via `prev`) and on the media it holds."""
    h = hashlib.sha256(prev or b"")
    h.update(",".join(map(str, token_ids)).encode())
    for m in media_hashes:
        h.update(m.encode())
    return h.digest()


class KVCacheManager:
    """Free list + per-sequence block tables. All methods are O(blocks touched)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise InvalidRequest(f"KV cache needs >= 1 block of >= 1 token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # insertion-ordered set: oldest-freed first out; O(1) removal when a cached free block is reused
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def blocks_needed(self, block_table: Sequence[int], num_tokens: int) -> int:
        """Extra blocks `block_table` needs to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(block_table))

    def can_allocate(self, block_table: Sequence[int], num_tokens: int) -> bool:
        return self.blocks_needed(block_table, num_tokens) <= len(self.free_block_ids)

    def allocate(self, block_table: list[int], num_tokens: int) -> None:
        """Grow `block_table` in place until it holds `num_tokens` tokens. Caller checks `can_allocate` first."""
        need = self.blocks_needed(block_table, num_tokens)
        if need > len(self.free_block_ids):
            raise RuntimeError(f"KV cache: need {need} blocks, {len(self.free_block_ids)} free")  # scheduler bug
        for _ in range(need):
            block = self.blocks[self.free_block_ids.popitem(last=False)[0]]
            assert block.ref_count == 0
            block.ref_count = 1
            if block.hash is not None:  # reused for new content: forget its old prefix entry
                if self.hash_to_block.get(block.hash) == block.block_id:
                    del self.hash_to_block[block.hash]
                block.hash = None
            block_table.append(block.block_id)

    def free(self, block_table: list[int]) -> None:
        """Release every block of a sequence (finish, abort, preemption) and empty its table."""
        for block_id in reversed(block_table):  # tail first: the most specific prefix blocks get reused first
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        block_table.clear()

    # --- prefix caching -------------------------------------------------------------------------------------------
    def match_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """Cached blocks for the longest run of leading full-block `hashes` (empty when prefix caching is off)."""
        if not self.enable_prefix_caching:
            return []
        out = []
        for h in hashes:
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            out.append(block_id)
        return out

    def can_allocate_with_prefix(self, matched: Sequence[int], num_tokens: int) -> bool:
        """Room for a new sequence of `num_tokens` whose first blocks are the cached `matched` ones."""
        reused_free = sum(1 for b in matched if self.blocks[b].ref_count == 0)
        return self.blocks_for(num_tokens) - len(matched) <= len(self.free_block_ids) - reused_free

    def share(self, block_table: list[int], matched: Sequence[int]) -> None:
        """Start an empty block table with the cached blocks `matched` (one more owner each)."""
        assert not block_table
        for block_id in matched:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            block_table.append(block_id)

    def register_full_blocks(self, block_table: Sequence[int], hashes: Sequence[bytes]) -> None:
        """Record the hashes of a sequence's full, computed blocks so later prompts can share them."""
        if not self.enable_prefix_caching:
            return
        for block_id, h in zip(block_table, hashes, strict=False):
            block = self.blocks[block_id]
            if block.hash is None:
                block.hash = h
                self.hash_to_block.setdefault(h, block_id)


def slot_mapping(block_table: Sequence[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat cache slots of the sequence's tokens [start, end): token j lives in block `block_table[j // size]`."""
    return [block_table[j // block_size] * block_size + j % block_size for j in range(start, end)]
