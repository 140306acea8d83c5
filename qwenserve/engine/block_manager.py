"""The paged KV pool's bookkeeping: block allocation and automatic prefix caching.

Every full block gets a chained hash (parent hash + its token ids), so one hash names
a whole prefix. The hash is a cryptographic digest, not Python's `hash()`: a hit compares
only the block's own token ids, so the earlier blocks' match rests on the hash alone, and
tuple hashes can be made to collide on purpose (one client's prompt would then reuse KV
computed for another's prefix). A block whose last user finishes stays in the hash table
and in the free list; it is reused on a hit and only evicted (least recently freed first)
when a fresh block is needed. Block 0 is reserved as the null block that padded entries of
block tables and padded tokens' slots point at.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from qwenserve.engine.sequence import Sequence

NULL_BLOCK = 0


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] | None = None


def chain_hash(parent: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    """The digest of a full block given its parent's: names the whole prefix up to and including it."""
    return hashlib.blake2b((parent or b"") + array("i", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    """Allocates KV blocks to sequences and shares cached prefix blocks between them."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks, got {num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.blocks[NULL_BLOCK].ref_count = 1  # never handed out
        # Insertion order = eviction order: the front is evicted first.
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self.num_evictions = 0

    @property
    def num_usable_blocks(self) -> int:
        return len(self.blocks) - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    def usage(self) -> float:
        """Fraction of usable blocks held by live sequences (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    # -- prefix cache ---------------------------------------------------------

    def block_hash(self, seq: Sequence, index: int) -> bytes:
        """The chained hash of `seq`'s full block `index` (its tokens must be known). Kept on the sequence,
        so each block is hashed once in its life: its tokens never change."""
        hashes, size = seq.block_hashes, self.block_size
        while len(hashes) <= index:
            i = len(hashes)
            hashes.append(chain_hash(hashes[-1] if hashes else None, tuple(seq.token_ids[i * size : (i + 1) * size])))
        return hashes[index]

    def num_shareable_blocks(self, seq: Sequence) -> int:
        """Full blocks of `seq` that a cache hit may cover: never its last token (at least one token must
        be computed to produce logits), never a token still in flight, none for a sequence that wants its
        prompt's logprobs (cached blocks carry no logits)."""
        if not self.enable_prefix_caching or seq.prompt_logprobs is not None:
            return 0
        return min(seq.num_tokens - 1, seq.num_known_tokens) // self.block_size

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks for the longest prefix of `seq` (hashes matched, then token ids compared);
        its blocks are hashed as far as the first one missing."""
        hashes, size = seq.block_hashes, self.block_size
        hits: list[int] = []
        for i in range(self.num_shareable_blocks(seq)):
            ids = tuple(seq.token_ids[i * size : (i + 1) * size])
            if i == len(hashes):  # inline block_hash: this loop runs for every block of a 20k-token prompt
                hashes.append(chain_hash(hashes[-1] if hashes else None, ids))
            block_id = self.hash_to_block.get(hashes[i])
            if block_id is None or self.blocks[block_id].token_ids != ids:
                break
            hits.append(block_id)
        return hits

    def allocate_cached_prefix(self, seq: Sequence, hits: list[int] | None = None) -> int:
        """Give a newly admitted sequence its cached prefix blocks (`hits`, else looked up); returns the
        tokens covered."""
        hits = self.cached_prefix(seq) if hits is None else hits
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_blocks[block_id]
            block.ref_count += 1
        seq.block_table = hits
        seq.num_committed_blocks = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        return seq.num_computed_tokens

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Enter the blocks that this step filled in the prefix cache so later requests can reuse them.

        A block whose content another block already caches is left out; its hash still extends
        the sequence's chain.
        """
        if not self.enable_prefix_caching:
            return
        # A block holding a token still in flight is entered once that token is known.
        num_full = min(seq.num_computed_tokens, seq.num_known_tokens) // self.block_size
        size = self.block_size
        for i in range(seq.num_committed_blocks, num_full):
            block, block_hash = self.blocks[seq.block_table[i]], self.block_hash(seq, i)
            if block.hash is None and block_hash not in self.hash_to_block:
                block.hash, block.token_ids = block_hash, tuple(seq.token_ids[i * size : (i + 1) * size])
                self.hash_to_block[block_hash] = block.block_id
        seq.num_committed_blocks = max(seq.num_committed_blocks, num_full)

    # -- allocation -------------------------------------------------------------

    def _take_free_block(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
                self.num_evictions += 1
            block.hash, block.token_ids = None, None
        block.ref_count = 1
        return block_id

    def ensure_capacity(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s block table to hold `num_tokens`; False (and nothing taken) if the pool is short."""
        needed = self.blocks_needed(num_tokens) - len(seq.block_table)
        if needed <= 0:
            return True
        if needed > self.num_free_blocks:
            return False
        seq.block_table.extend(self._take_free_block() for _ in range(needed))
        return True

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks. Hashed blocks stay cached; the tail is queued for eviction first
        so a shared prefix outlives the sequence-specific blocks after it."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
                if block.hash is None:
                    self.free_blocks.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        # A preempted sequence recomputes into new blocks: they must be entered in the cache again.
        seq.num_committed_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence holds (after warm-up, or on request)."""
        for block_id in self.free_blocks:
            block = self.blocks[block_id]
            if block.hash is not None:
                self.hash_to_block.pop(block.hash, None)
                block.hash, block.token_ids = None, None
