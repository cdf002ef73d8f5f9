"""Block-paged KV cache bookkeeping (no tensors): which cache blocks each sequence owns.

The cache is `num_blocks` blocks of `block_size` token slots; a sequence's `block_table` lists its blocks in order, so
token `j` of the sequence lives in slot `block_table[j // block_size] * block_size + j % block_size`. The runner owns
the actual per-layer K/V tensors `[num_blocks, block_size, n_kv, head_dim]`.

Prefix-caching seam: blocks carry a `ref_count` and a `hash`; `block_hash` chains (previous hash, the block's token
ids, the content hashes of the media whose slots it holds). A future `match_prefix` would look full-block hashes up in
`hash_to_block` at admission and share those blocks (ref_count += 1) instead of recomputing them; `free` already
only returns a block to the free list when its last owner lets go.
"""

from __future__ import annotations

import hashlib
from collections import deque
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
        self.free_block_ids: deque[int] = deque(range(num_blocks))
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
            block = self.blocks[self.free_block_ids.popleft()]
            assert block.ref_count == 0
            block.ref_count = 1
            if block.hash is not None:  # reused for new content: forget its old prefix entry
                self.hash_to_block.pop(block.hash, None)
                block.hash = None
            block_table.append(block.block_id)

    def free(self, block_table: list[int]) -> None:
        """Release every block of a sequence (finish, abort, preemption) and empty its table."""
        for block_id in reversed(block_table):  # tail first: the most specific prefix blocks get reused first
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_block_ids.append(block_id)
        block_table.clear()

    def slot(self, block_table: Sequence[int], position: int) -> int:
        """Flat cache slot of the sequence's token number `position`."""
        return block_table[position // self.block_size] * self.block_size + position % self.block_size


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
