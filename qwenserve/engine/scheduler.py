"""Continuous batching with chunked prefill, prefix-cache admission and recompute preemption.

Every step spends a token budget: running sequences first (a decode costs one token,
an unfinished prefill continues with its next chunk), then waiting sequences are
admitted while budget, sequence slots and blocks last. A 20k-token prompt is thus cut
into chunks that share steps with the decodes of other streams. When the pool runs
dry the newest running sequence is preempted: its blocks are freed and it re-enters
the front of the queue, to be recomputed (mostly from the prefix cache) later. A waiting
sequence whose next block a running one is computing waits for it to land in the cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qwenserve.engine.block_manager import BlockManager
from qwenserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """The sequences of one step and how many new tokens each computes."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        """Schedule `num_tokens` of `seq`'s tokens in this step."""
        self.seqs.append(seq)
        self.num_new_tokens.append(num_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    """Continuous batching over the waiting queue and the running list, FCFS, with chunked prefill."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Add `seq` to the waiting queue."""
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        """The next step's batch: running sequences first (preempting the newest when blocks run out),
        then waiting ones admitted with their cached prefix, within the token budget."""
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.draining:  # its final token is in flight; nothing left to compute
                i += 1
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self._reserve(seq, num_new):
                batch.add(seq, num_new)
                budget -= num_new
                i += 1
            else:
                preempted = True  # _reserve fails only once seq itself was preempted: nothing newer is left
                break
        # Admitting new work right after a preemption would only thrash the cache.
        if not preempted:
            self._admit_waiting(batch, budget)
        return batch

    def _reserve(self, seq: Sequence, num_new: int) -> bool:
        """Find blocks for seq's next chunk, preempting newer sequences (then seq itself) if needed."""
        while not self.block_manager.ensure_capacity(seq, seq.num_computed_tokens + num_new):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        if not self.waiting:
            return
        bm = self.block_manager
        in_flight = {h for seq in self.running if (h := self._next_block_hash(seq)) is not None}
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = bm.cached_prefix(seq)
            if self._awaits_block(seq, len(hits), in_flight):
                break  # first come, first served: one admitted behind it would take the budget before it
            self.waiting.popleft()
            num_cached = bm.allocate_cached_prefix(seq, hits)
            if not seq.admitted:
                # A sibling (n > 1) finds the prompt choice 0 just computed: for the request that is no
                # cache hit, so only choice 0 reports one (usage takes the largest).
                seq.num_cached_tokens = num_cached if seq.index == 0 else 0
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not bm.ensure_capacity(seq, seq.num_computed_tokens + num_new):
                bm.free(seq)
                self.waiting.appendleft(seq)
                break
            seq.admitted = True
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new
            if (block_hash := self._next_block_hash(seq)) is not None:
                in_flight.add(block_hash)

    def _next_block_hash(self, seq: Sequence) -> bytes | None:
        """The hash of the block a running `seq` computes next (None: not a full block of known tokens)."""
        bm = self.block_manager
        index = seq.num_computed_tokens // bm.block_size
        return bm.block_hash(seq, index) if (index + 1) * bm.block_size <= seq.num_known_tokens else None

    def _awaits_block(self, seq: Sequence, index: int, in_flight: set[bytes]) -> bool:
        """Whether block `index` of `seq`, the first missing from the prefix cache, is one a running
        sequence computes next (the same tokens after the same prefix: the hash says both). Then `seq`
        waits: once that block is done it is a cache hit, where admitting `seq` now would compute the
        shared prefix twice (agents sending one system prompt at once, a retried request)."""
        bm = self.block_manager
        return index < bm.num_shareable_blocks(seq) and bm.block_hash(seq, index) in in_flight

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished (or aborted) sequence from the queues and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
