"""Randomized, seeded, stateful tests of the paged KV cache and the scheduler.

A server that runs for hours (agents resending ~20k-token prompts that share prefixes, clients hanging
up at any moment, a pool small enough to evict and preempt) would show a leaked block, a double free or
a corrupted cached block only after hours. These tests drive the real BlockManager, and the real engine
on a tiny model, through thousands of random operations in seconds, and check after every one:

- the pool: every block is free (refcount 0, once in the free list) or held (refcount = the number of
  live block tables holding it, none free), free + held = the pool; the null block is never handed out;
- the prefix cache: the hash map and the blocks' hashes agree both ways; a cached block's tokens are
  those its chained hash names (re-derived from the sequence that hashed it); a block shared by two
  tables is a cached one; a cached block with no holder is in the free list (evictable);
- the KV itself, through a shadow pool: each slot records which (prefix, token) was written there, and
  every position a sequence attends to must hold what that sequence would have computed. No shared or
  cached block is ever written;
- the scheduler: each unfinished sequence is in exactly one place (running, waiting, held as a sibling);
  only running ones hold blocks; the engine goes idle with every block free and every request ended;
- the outputs: a request that completes gives what it gives alone (greedy); an aborted one a prefix of it.

`QWENSERVE_LONG_FUZZ=N` runs N seeds of each (`START:N` from seed START) instead of the few the suite
runs; a failure names its seed, which replays it exactly.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qwenserve.config import EngineConfig
from qwenserve.engine.block_manager import NULL_BLOCK, BlockManager, chain_hash
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.engine.model_runner import ForwardStep
from qwenserve.engine.outputs import RequestOutput
from qwenserve.engine.sampling_params import SamplingParams
from qwenserve.engine.scheduler import ScheduledBatch
from qwenserve.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus


def fuzz_seeds(default: int) -> list[int]:
    """The seeds to run: `default` in the suite, or as QWENSERVE_LONG_FUZZ says ('N' or 'START:N')."""
    spec = os.environ.get("QWENSERVE_LONG_FUZZ", "")
    if not spec:
        return list(range(default))
    start, _, count = spec.rpartition(":")
    return list(range(int(start or 0), int(start or 0) + int(count)))


# -- the shadow KV pool --------------------------------------------------------------------------

# What position p of a sequence holds in the KV cache: (identity of the prefix before p, token at p).
# The identity chains Python's tuple hash (deterministic for ints) over every earlier token, so a slot
# with the right token after the wrong prefix is caught too. A token still in flight is PENDING_TOKEN
# (its KV is written from the device-side id): it matches any token at that position.
Ident = tuple[int, int]


def position_idents(token_ids: list[int] | tuple[int, ...], end: int) -> list[Ident]:
    """The identity of each of the first `end` positions of a sequence holding `token_ids`."""
    idents, chain = [], 0
    for token in token_ids[:end]:
        idents.append((chain, token))
        chain = hash((chain, token))
    return idents


def same_content(stored: Ident | None, expected: Ident) -> bool:
    if stored is None or stored[0] != expected[0]:
        return False
    return stored[1] == expected[1] or PENDING_TOKEN in (stored[1], expected[1])


class ShadowKV:
    """What each slot of the pool was last written with, to check every read against what it should be."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.slots: dict[int, Ident] = {}

    def slot(self, block_table: list[int], pos: int) -> int:
        return block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def write(self, bm: BlockManager, seq: Sequence, start: int, end: int) -> None:
        """Record that `seq` computes positions start..end-1 into its blocks (none of them shared or cached)."""
        idents = position_idents(seq.token_ids, end)
        for pos in range(start, end):
            block = bm.blocks[seq.block_table[pos // self.block_size]]
            assert block.block_id != NULL_BLOCK, f"{seq} writes position {pos} into the null block"
            assert block.ref_count == 1 and block.hash is None, (
                f"{seq} writes position {pos} into block {block.block_id} (refcount {block.ref_count}, "
                f"cached {block.hash is not None}): another sequence's KV is overwritten"
            )
            self.slots[self.slot(seq.block_table, pos)] = idents[pos]

    def check_reads(self, seq: Sequence, end: int) -> None:
        """Every position below `end` that `seq` attends to holds what `seq` would have computed there."""
        idents = position_idents(seq.token_ids, end)
        for pos in range(end):
            stored = self.slots.get(self.slot(seq.block_table, pos))
            assert same_content(stored, idents[pos]), (
                f"{seq} reads wrong KV at position {pos} (block {seq.block_table[pos // self.block_size]}): "
                f"holds {stored}, expected {idents[pos]}"
            )


# -- invariants ----------------------------------------------------------------------------------


class HashRegistry:
    """Every chained hash any sequence computed, with the prompt prefix it names (checked when seen)."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.prefixes: dict[bytes, tuple[int, ...]] = {}
        self._idents: dict[bytes, list[Ident]] = {}
        self._seen: dict[int, int] = {}  # seq_id -> how many of its hashes were registered

    def register(self, seq: Sequence) -> None:
        """Check and record `seq`'s new block hashes: each is the chain of its parent and its own tokens."""
        size, hashes = self.block_size, seq.block_hashes
        for i in range(self._seen.get(seq.seq_id, 0), len(hashes)):
            prefix = tuple(seq.token_ids[: (i + 1) * size])
            assert len(prefix) == (i + 1) * size and PENDING_TOKEN not in prefix, f"{seq}: block {i} hashed unknown tokens"
            assert hashes[i] == chain_hash(hashes[i - 1] if i else None, prefix[-size:]), f"{seq}: block {i}'s hash is stale"
            assert self.prefixes.setdefault(hashes[i], prefix) == prefix, f"{seq}: two prefixes share block {i}'s hash"
        self._seen[seq.seq_id] = len(hashes)

    def idents(self, block_hash: bytes) -> list[Ident]:
        if block_hash not in self._idents:
            prefix = self.prefixes[block_hash]
            self._idents[block_hash] = position_idents(prefix, len(prefix))
        return self._idents[block_hash]


def check_pool(bm: BlockManager, holders: Iterable[Sequence]) -> None:
    """Refcounts, the free list and the pool's size agree with the block tables of `holders`."""
    null = bm.blocks[NULL_BLOCK]
    assert null.ref_count == 1 and null.hash is None and NULL_BLOCK not in bm.free_blocks, f"null block: {null}"
    refs: Counter[int] = Counter()
    for seq in holders:
        assert len(set(seq.block_table)) == len(seq.block_table), f"{seq} holds a block twice: {seq.block_table}"
        assert NULL_BLOCK not in seq.block_table, f"{seq} holds the null block"
        refs.update(seq.block_table)
    assert all(0 < b < len(bm.blocks) for b in bm.free_blocks), f"free list holds a bad id: {list(bm.free_blocks)}"
    for block in bm.blocks[1:]:
        b = block.block_id
        assert block.ref_count == refs[b], f"block {b}: refcount {block.ref_count} but {refs[b]} tables hold it"
        assert (block.ref_count == 0) == (b in bm.free_blocks), f"block {b}: refcount {block.ref_count}, free list"
        assert block.ref_count <= 1 or block.hash is not None, f"block {b} is shared by {block.ref_count} but not cached"
    assert bm.num_free_blocks + sum(1 for blk in bm.blocks[1:] if blk.ref_count) == bm.num_usable_blocks
    # Never-cached free blocks are handed out first: a cached one is evicted only when none is left.
    cached = [bm.blocks[b].hash is not None for b in bm.free_blocks]
    assert cached == sorted(cached), f"a cached free block would be evicted before an uncached one: {cached}"


def check_prefix_cache(bm: BlockManager, holders: Iterable[Sequence], registry: HashRegistry, kv: ShadowKV) -> None:
    """The hash map and the blocks agree; cached blocks hold the tokens (and the KV) their hash names."""
    size = bm.block_size
    for block_hash, b in bm.hash_to_block.items():
        block = bm.blocks[b]
        assert block.hash == block_hash, f"hash map names block {b}, whose hash is {block.hash}"
        assert block_hash in registry.prefixes, f"block {b} is cached under a hash no sequence computed"
        prefix = registry.prefixes[block_hash]
        assert block.token_ids == prefix[-size:], f"block {b}: tokens {block.token_ids} but its hash names {prefix[-size:]}"
        idents = registry.idents(block_hash)
        for offset in range(size):
            stored = kv.slots.get(b * size + offset)
            assert same_content(stored, idents[len(prefix) - size + offset]), f"cached block {b}'s KV was overwritten"
    for block in bm.blocks:
        assert block.hash is None or bm.hash_to_block.get(block.hash) == block.block_id, f"stale hash on {block}"
    for seq in holders:
        assert len(seq.block_table) >= bm.blocks_needed(seq.num_computed_tokens), f"{seq}: computed past its blocks"
        assert seq.num_committed_blocks <= seq.num_computed_tokens // size, f"{seq}: committed an unfinished block"
        for i, b in enumerate(seq.block_table):
            cached_as = bm.blocks[b].hash
            if cached_as is not None and i < len(seq.block_hashes):
                assert cached_as == seq.block_hashes[i], f"{seq}: block {i} is cached as another prefix"


def check_kv(bm: BlockManager, holders: Iterable[Sequence], registry: HashRegistry, kv: ShadowKV) -> None:
    """All block invariants, for the sequences that hold blocks (every other one must hold none)."""
    holders = list(holders)
    for seq in holders:
        registry.register(seq)
    check_pool(bm, holders)
    check_prefix_cache(bm, holders, registry, kv)


# -- 1. the BlockManager on its own ------------------------------------------------------------------


class BlockManagerFuzz:
    """Drives a BlockManager as the scheduler and the engine do (admission with cached prefixes, chunks,
    samples still in flight, stops, aborts, preemption, n > 1 siblings, cache resets), each operation
    picked at random, and checks every invariant and every read of the shadow KV after each one."""

    def __init__(self, seed: int):
        self.rng = rng = random.Random(seed)
        self.block_size = rng.choice([1, 2, 4, 8])
        self.bm = BlockManager(rng.randint(3, 24), self.block_size, enable_prefix_caching=rng.random() < 0.9)
        self.kv = ShadowKV(self.block_size)
        self.registry = HashRegistry(self.block_size)
        self.max_tokens = self.bm.num_usable_blocks * self.block_size
        # A tiny alphabet: different prefixes end in blocks of equal tokens, whose hashes must still differ.
        self.alphabet = rng.randint(2, 6)
        self.prefixes = [self.random_tokens(rng.randint(0, 3 * self.block_size + 2)) for _ in range(3)]
        self.running: list[Sequence] = []
        self.waiting: list[Sequence] = []
        self.everyone: list[Sequence] = []  # every sequence created: the hashes of ended ones stay cached
        self.num_ops = 0

    def random_tokens(self, count: int) -> list[int]:
        return [self.rng.randrange(self.alphabet) for _ in range(count)]

    def new_prompt(self) -> list[int]:
        prompt = self.rng.choice(self.prefixes) + self.random_tokens(self.rng.randint(1, 2 * self.block_size + 1))
        return prompt[: max(1, self.max_tokens // 2)]

    def run(self, num_ops: int) -> None:
        ops: list[tuple[Callable[[], None], int]] = [
            (self.arrive, 3), (self.admit, 4), (self.compute, 10), (self.resolve, 6), (self.stop, 2),
            (self.abort, 2), (self.preempt, 2), (self.fork, 1), (self.reset_cache, 1),
        ]  # fmt: skip
        actions, weights = zip(*ops, strict=True)
        for _ in range(num_ops):
            self.rng.choices(actions, weights)[0]()
            self.num_ops += 1
            self.check()
        for seq in self.running + self.waiting:
            self.bm.free(seq)
        self.running, self.waiting = [], []
        self.check()
        assert self.bm.num_free_blocks == self.bm.num_usable_blocks, "blocks leaked once every sequence ended"

    def check(self) -> None:
        for seq in self.everyone:
            self.registry.register(seq)
        check_kv(self.bm, self.running, self.registry, self.kv)
        for seq in self.waiting:
            assert not seq.block_table and seq.num_computed_tokens == 0, f"waiting {seq} holds blocks"
        for seq in self.running:
            self.kv.check_reads(seq, seq.num_computed_tokens)

    # -- operations ---------------------------------------------------------------------------

    def arrive(self) -> None:
        self.add(Sequence("r", 0, self.new_prompt(), SamplingParams(), seed=0))

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.everyone.append(seq)

    def admit(self) -> None:
        """The scheduler's admission: cached prefix, then blocks for the first chunk (else back it goes)."""
        # Never with two samples in flight: the engine schedules a sequence only once the older one is back.
        ready = [s for s in self.waiting if s.num_pending_tokens <= 1]
        if not ready:
            return
        seq = self.rng.choice(ready)
        self.waiting.remove(seq)
        hits = self.bm.cached_prefix(seq) if self.rng.random() < 0.5 else None
        self.bm.allocate_cached_prefix(seq, hits)
        self.kv.check_reads(seq, seq.num_computed_tokens)
        self.running.append(seq)
        if not self.compute_chunk(seq):
            self.running.remove(seq)
            self.bm.free(seq)
            self.waiting.append(seq)

    def compute(self) -> None:
        ready = [s for s in self.running if s.num_computed_tokens < s.num_tokens and s.num_pending_tokens <= 1]
        if ready:
            self.compute_chunk(self.rng.choice(ready))

    def compute_chunk(self, seq: Sequence) -> bool:
        """One step of `seq`: a chunk of what it has not computed; a sample (in flight) when it reaches
        its last token. False, with nothing taken, when the pool is short."""
        left = seq.num_tokens - seq.num_computed_tokens
        if left <= 0:
            return True
        num_new = self.rng.randint(1, left)
        free_before, table_before = self.bm.num_free_blocks, list(seq.block_table)
        if not self.bm.ensure_capacity(seq, seq.num_computed_tokens + num_new):
            assert (self.bm.num_free_blocks, seq.block_table) == (free_before, table_before), "a failed grow took blocks"
            return False
        self.kv.write(self.bm, seq, seq.num_computed_tokens, seq.num_computed_tokens + num_new)
        seq.num_computed_tokens += num_new
        self.bm.commit_full_blocks(seq)
        if seq.num_computed_tokens == seq.num_tokens and seq.num_tokens < self.max_tokens:
            seq.token_ids.append(PENDING_TOKEN)
            seq.num_pending_tokens += 1
        return True

    def resolve(self) -> None:
        """The oldest in-flight sample reaches the host: mostly a function of the prefix, so that equal
        prefixes keep growing equal (shared decoded blocks), sometimes anything."""
        pending = [s for s in self.running + self.waiting if s.num_pending_tokens]
        if not pending:
            return
        seq = self.rng.choice(pending)
        index = seq.num_tokens - seq.num_pending_tokens
        chain = hash(tuple(seq.token_ids[:index]))
        seq.token_ids[index] = chain % self.alphabet if self.rng.random() < 0.8 else self.rng.randrange(self.alphabet)
        seq.num_pending_tokens -= 1
        if seq.block_table:
            self.bm.commit_full_blocks(seq)

    def stop(self) -> None:
        """A sequence stops on a token it just got: the one launched after it is dropped, its blocks freed."""
        done = [s for s in self.running if s.num_pending_tokens]
        if not done:
            return
        seq = self.rng.choice(done)
        self.resolve_all(seq)
        self.finish(seq)

    def resolve_all(self, seq: Sequence) -> None:
        """The oldest sample in flight reaches the host and ends `seq`: any later one is dropped."""
        index = seq.num_tokens - seq.num_pending_tokens
        seq.token_ids[index] = self.rng.randrange(self.alphabet)
        del seq.token_ids[index + 1 :]
        seq.num_pending_tokens = 0
        self.bm.commit_full_blocks(seq)

    def abort(self) -> None:
        everyone = self.running + self.waiting
        if everyone:
            self.finish(self.rng.choice(everyone))

    def finish(self, seq: Sequence) -> None:
        """A sequence ends (stopped, aborted, whether running or waiting): its blocks go back to the pool."""
        (self.running if seq in self.running else self.waiting).remove(seq)
        self.bm.free(seq)
        self.bm.free(seq)  # a second free (abort after finish) must be a no-op

    def preempt(self) -> None:
        """Recompute preemption: the blocks go back, the sequence to the front of the queue."""
        if self.running:
            seq = self.running.pop(self.rng.randrange(len(self.running)))
            self.bm.free(seq)
            self.waiting.insert(0, seq)

    def fork(self) -> None:
        """n > 1: a sibling of a running sequence arrives with the same prompt."""
        if self.running:
            parent = self.rng.choice(self.running)
            self.add(Sequence("r", 1, parent.token_ids[: parent.num_prompt_tokens], SamplingParams(), seed=1))

    def reset_cache(self) -> None:
        if self.rng.random() < 0.2:
            self.bm.reset_prefix_cache()


@pytest.mark.parametrize("seed", fuzz_seeds(60))
def test_block_manager_keeps_its_invariants_under_random_operations(seed: int) -> None:
    fuzz = BlockManagerFuzz(seed)
    fuzz.run(400)
    assert fuzz.num_ops == 400


# -- 2. the engine on a tiny model -------------------------------------------------------------------

MAX_TOKENS = 12

# How a request samples. Each is batch-independent (a seeded sample's noise is a hash of seed and
# position; penalties are kept per sequence), so every one must give what it gives alone.
STYLES: dict[str, dict[str, float | int]] = {
    "greedy": {"temperature": 0.0},
    "sampled": {"temperature": 0.8, "top_k": 20, "top_p": 0.9},
    "penalized": {"temperature": 0.0, "repetition_penalty": 1.3, "presence_penalty": 0.5},
    "logprobs": {"temperature": 0.0, "logprobs": 2},
    "prompt_logprobs": {"temperature": 0.0, "prompt_logprobs": 1},  # skips the prefix cache
}


class AloneOutputs:
    """Each prompt's tokens when it runs alone (one choice, its own seed), on an engine with room to spare
    and no prefix cache."""

    def __init__(self, model_dir: Path):
        self.engine = LLMEngine(EngineConfig(
            model=str(model_dir), device="cpu", dtype="float32", num_kv_blocks=260, enable_prefix_caching=False,
        ))  # fmt: skip
        self.memo: dict[tuple[tuple[int, ...], str, int], list[int]] = {}

    def __call__(self, prompt: list[int], style: str = "greedy", seed: int = 0) -> list[int]:
        seed = seed if STYLES[style]["temperature"] else 0  # greedy: the seed changes nothing
        key = (tuple(prompt), style, seed)
        if key not in self.memo:
            params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, seed=seed, **STYLES[style])
            self.memo[key] = self.engine.generate([prompt], params)[0][0].token_ids
        return self.memo[key]


@dataclass
class Choice:
    """What a client received for one choice of a request."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class FuzzRequest:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    expected: list[list[int]]  # each choice's tokens if it completes
    choices: list[Choice]


class EngineFuzz:
    """Random arrivals (conversations resending their history, prompts sharing a few system prefixes,
    n > 1, stop tokens), random aborts in every state a request can be in, on an engine with a small
    pool, a small step budget, overlapped steps or not. Every forward's reads are checked against the
    shadow KV, and the pool, the cache and the queues after every step."""

    def __init__(self, seed: int, model_dir: Path, alone: AloneOutputs):
        self.rng = rng = random.Random(seed)
        self.seed, self.alone = seed, alone
        block_size = rng.choice([1, 2, 4, 8, 16])
        self.engine = LLMEngine(EngineConfig(
            model=str(model_dir), device="cpu", dtype="float32", block_size=block_size,
            num_kv_blocks=rng.randint(64, 320) // block_size + 1, max_num_seqs=rng.choice([1, 2, 3, 4, 8]),
            max_num_batched_tokens=rng.choice([3, 7, 16, 33, 64, 256]), async_scheduling=rng.random() < 0.75,
            enable_prefix_caching=rng.random() < 0.9,
        ))  # fmt: skip
        self.max_len = self.engine.max_model_len
        self.kv = ShadowKV(block_size)
        self.registry = HashRegistry(block_size)
        self.system_prompts = [self.random_tokens(rng.randint(block_size, self.max_len // 2)) for _ in range(3)]
        self.conversations: list[list[int]] = []  # each one's history: its last prompt and answer
        self.requests: dict[str, FuzzRequest] = {}
        self.seqs: list[Sequence] = []
        self.num_steps = 0
        self._observe_forwards()

    def random_tokens(self, count: int) -> list[int]:
        return [self.rng.randrange(500) for _ in range(count)]

    def _observe_forwards(self) -> None:
        """Check each forward's reads against the shadow KV and record its writes (the real forward runs)."""
        runner, real_forward = self.engine.runner, self.engine.runner.forward

        def forward(batch: ScheduledBatch) -> ForwardStep:
            for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
                self.kv.check_reads(seq, seq.num_computed_tokens)
                self.kv.write(self.engine.block_manager, seq, seq.num_computed_tokens, seq.num_computed_tokens + num_new)
            return real_forward(batch)

        runner.forward = forward

    # -- arrivals -------------------------------------------------------------------------------

    def new_prompt(self) -> list[int]:
        """Mostly a conversation's next turn (its history, the answer, a new message) or a system prompt
        with a new message; sometimes a prompt sent again as it was (a retry)."""
        rng, history = self.rng, None
        roll = rng.random()
        if roll < 0.1 and self.requests:
            return list(rng.choice(list(self.requests.values())).prompt)
        if roll < 0.5 and self.conversations:
            history = rng.choice(self.conversations)
        base = history if history is not None else rng.choice(self.system_prompts)
        prompt = base + self.random_tokens(rng.randint(1, 24))
        if len(prompt) >= self.max_len - 1:
            prompt = rng.choice(self.system_prompts) + self.random_tokens(rng.randint(1, 8))
        if history is not None:
            self.conversations.remove(history)
        self.conversations.append(prompt + self.alone(prompt)[: rng.randint(0, MAX_TOKENS)])
        return prompt

    def arrive(self) -> None:
        rng = self.rng
        prompt, style, seed = self.new_prompt(), rng.choice(list(STYLES)), rng.randrange(1 << 16)
        n, max_tokens = rng.choice([1, 1, 1, 2, 3]), rng.randint(1, MAX_TOKENS)
        stop = [rng.choice(self.alone(prompt, style, seed))] if rng.random() < 0.2 else []
        params = SamplingParams(
            max_tokens=max_tokens, ignore_eos=True, stop_token_ids=stop, n=n, seed=seed, **STYLES[style]
        )
        expected = [self.expected(prompt, style, seed + i, max_tokens, stop) for i in range(n)]
        request_id = f"s{self.seed}-r{len(self.requests)}"
        self.requests[request_id] = FuzzRequest(request_id, prompt, params, expected, [Choice() for _ in range(n)])
        self.engine.add_request(request_id, prompt, params)
        self.seqs += self.engine.requests[request_id].seqs

    def expected(self, prompt: list[int], style: str, seed: int, max_tokens: int, stop: list[int]) -> list[int]:
        """A choice's tokens alone, cut to its max_tokens and the room left in this engine's context,
        and after its stop token."""
        tokens = self.alone(prompt, style, seed)[: min(max_tokens, self.max_len - len(prompt))]
        return tokens[: tokens.index(stop[0]) + 1] if stop and stop[0] in tokens else tokens

    # -- aborts -------------------------------------------------------------------------------

    def abort_candidates(self) -> dict[str, list[str]]:
        """Unfinished requests by the state an abort would catch them in."""
        eng, bm = self.engine, self.engine.block_manager
        in_flight = {s.request_id for s in eng._in_flight.seqs} if eng._in_flight is not None else set()
        computing = {h for s in eng.scheduler.running if (h := self.next_block_hash(s)) is not None}
        kinds: dict[str, list[str]] = {k: [] for k in ("queued", "awaiting", "preempted", "prefill", "decode", "held")}
        for request_id, req in eng.requests.items():
            for seq in req.seqs:
                if seq in eng.scheduler.waiting:
                    kinds["preempted" if seq.admitted else "queued"].append(request_id)
                    missing = len(bm.cached_prefix(seq))
                    if missing < bm.num_shareable_blocks(seq) and bm.block_hash(seq, missing) in computing:
                        kinds["awaiting"].append(request_id)
                elif seq.status is SequenceStatus.RUNNING:
                    kinds["prefill" if seq.num_computed_tokens < seq.num_prompt_tokens else "decode"].append(request_id)
            if req.held_siblings:
                kinds["held"].append(request_id)
        kinds["in_flight"] = sorted(in_flight & set(eng.requests))
        kinds["finished"] = [r for r in self.requests if r not in eng.requests]
        return {kind: ids for kind, ids in kinds.items() if ids}

    def next_block_hash(self, seq: Sequence) -> bytes | None:
        bm = self.engine.block_manager
        index = seq.num_computed_tokens // bm.block_size
        return bm.block_hash(seq, index) if (index + 1) * bm.block_size <= seq.num_known_tokens else None

    def abort_one(self) -> None:
        candidates = self.abort_candidates()
        if not candidates:
            return
        request_id = self.rng.choice(candidates[self.rng.choice(sorted(candidates))])
        self.record(self.engine.abort(request_id))

    # -- stepping -------------------------------------------------------------------------------

    def record(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            choice = self.requests[out.request_id].choices[out.index]
            assert choice.finish_reason is None, f"{out.request_id}#{out.index}: output after its end: {out}"
            choice.token_ids += out.token_ids
            choice.finish_reason = out.finish_reason
            choice.num_generated_tokens = out.num_generated_tokens
            choice.num_cached_tokens = out.num_cached_tokens

    def step(self) -> None:
        self.record(self.engine.step())
        self.num_steps += 1
        self.check()

    def run(self, num_requests: int, arrival_steps: int) -> None:
        # In bursts: requests sharing a prefix arrive together, one computing what the others wait for.
        bursts = self.rng.sample(range(arrival_steps), self.rng.randint(2, 8))
        arrivals = Counter(self.rng.choice(bursts) for _ in range(num_requests))
        abort_rate = self.rng.choice([0.0, 0.05, 0.15, 0.3])
        for step in range(arrival_steps):
            for _ in range(arrivals[step]):
                self.arrive()
            while self.rng.random() < abort_rate:
                self.abort_one()
            self.step()
        self.drain()
        self.check_outputs()

    def drain(self) -> None:
        """Step until idle, however long the last request takes, within a bound no request may need."""
        eng, limit = self.engine, 40 * len(self.requests) * (MAX_TOKENS + self.max_len) + 100
        while eng.has_unfinished():
            assert self.num_steps < limit, f"never finishes: {eng.requests.keys()}, {eng.scheduler.running}, {eng.scheduler.waiting}"
            self.step()
        bm = eng.block_manager
        assert bm.num_free_blocks == bm.num_usable_blocks, "idle, yet blocks are held"
        assert not eng.scheduler.running and not eng.scheduler.waiting and not eng.seq_states
        assert not eng.runner.penalties.row_of
        self.step()  # the step still in flight, if any: every token of it is dropped
        assert bm.num_free_blocks == bm.num_usable_blocks

    # -- checks -------------------------------------------------------------------------------

    def check(self) -> None:
        eng = self.engine
        sched = eng.scheduler
        for seq in self.seqs:
            self.registry.register(seq)
        check_kv(eng.block_manager, sched.running, self.registry, self.kv)
        for seq in self.seqs:
            if seq not in sched.running:
                assert not seq.block_table, f"{seq} holds blocks but is not running"
        assert len(sched.running) <= eng.config.max_num_seqs
        in_flight = set(eng._in_flight.seqs) if eng._in_flight is not None else set()
        for req in eng.requests.values():
            assert not all(s.is_finished for s in req.seqs), f"{req.request_id} ended but was never popped"
            for seq in req.seqs:
                self.check_placed(seq, req.held_siblings)
                assert seq.num_pending_tokens <= 1 and (not seq.num_pending_tokens or seq in in_flight), (
                    f"{seq} waits on a token no step computes"
                )

    def check_placed(self, seq: Sequence, held: list[Sequence]) -> None:
        """An unfinished sequence is in exactly one of running, waiting and held (a sibling not yet released)."""
        sched = self.engine.scheduler
        places = [sched.running.count(seq), sched.waiting.count(seq), held.count(seq)]
        if seq.is_finished:
            assert places == [0, 0, 0], f"finished {seq} still queued: {places}"
            return
        assert sorted(places) == [0, 0, 1], f"{seq} in (running, waiting, held) {places} times"
        assert seq.status is (SequenceStatus.RUNNING if places[0] else SequenceStatus.WAITING), f"{seq}: status"

    def check_outputs(self) -> None:
        """Every choice ended once; the completed ones gave their alone output, the aborted a prefix of it."""
        for req in self.requests.values():
            for i, (choice, expected) in enumerate(zip(req.choices, req.expected, strict=True)):
                where = f"seed {self.seed}, {req.request_id}#{i} (prompt of {len(req.prompt)}, {req.params})"
                assert choice.finish_reason is not None, f"{where}: never ended"
                if choice.finish_reason == "abort":
                    assert choice.token_ids == expected[: len(choice.token_ids)], f"{where}: aborted after wrong tokens"
                    continue
                assert choice.token_ids == expected, f"{where}: {choice.token_ids} != alone {expected}"
                assert choice.num_generated_tokens == len(choice.token_ids), where
                cached, block_size = choice.num_cached_tokens, self.engine.config.block_size
                assert cached % block_size == 0 and cached < len(req.prompt), f"{where}: {cached} cached tokens"


@pytest.fixture(scope="module")
def alone_outputs(tiny_moe_dir: Path) -> AloneOutputs:
    return AloneOutputs(tiny_moe_dir)


@pytest.mark.parametrize("seed", fuzz_seeds(6))
def test_engine_keeps_kv_and_outputs_intact_under_random_traffic(
    seed: int, tiny_moe_dir: Path, alone_outputs: AloneOutputs
) -> None:
    fuzz = EngineFuzz(seed, tiny_moe_dir, alone_outputs)
    fuzz.run(num_requests=14, arrival_steps=30)
    assert fuzz.num_steps > 0
