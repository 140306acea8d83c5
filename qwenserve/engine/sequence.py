"""One sequence (one choice of one request) as the scheduler and the runner see it."""

from __future__ import annotations

import itertools
from enum import Enum, auto
from typing import Any

from qwenserve.engine.outputs import TokenLogprob
from qwenserve.engine.sampling_params import SamplingParams

_seq_counter = itertools.count()

# Stands in `token_ids` for a token that was sampled on the device but has not reached
# the host yet (the engine runs one step ahead); its real id is read on the device.
PENDING_TOKEN = -1


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Token ids (prompt then output), how many of them have KV in the cache, and the block table.

    The scheduler's unit of work is `num_tokens - num_computed_tokens`: a whole prompt
    chunk while prefilling, exactly one token while decoding. When a step computes a
    sequence up to its last token, a new token is sampled.

    With the next step launched before the current one's tokens are back on the host,
    the newest `num_pending_tokens` entries of `token_ids` are PENDING_TOKEN; counts that
    decide when to stop use only the tokens already known (`num_known_tokens`).
    """

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams, seed: int):
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.index = index
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.seed = seed
        self.max_tokens = params.max_tokens or 1
        # Token ids that end the output (EOS unless ignore_eos, stop_token_ids): the sampler may not pick
        # them while fewer than params.min_tokens tokens exist. Set by the engine, which knows the EOS ids.
        self.min_tokens_banned: tuple[int, ...] = ()
        # Structured output: an xgrammar matcher that has accepted every known output token (engine.guided).
        self.matcher: Any = None
        self.grammar_too_slow = False  # its matcher took too long for one step's mask (guided.GRAMMAR_STEP_SECONDS)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of its full blocks, computed as needed (block_manager)
        self.num_committed_blocks = 0  # leading blocks of block_table already offered to the prefix cache
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first admission
        self.admitted = False
        self.num_pending_tokens = 0
        self.draining = False  # its last token is in flight and it will stop on it: schedule no more
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # Logprobs of the prompt's own tokens (choice 0 of a request that asks): filled as its prefill
        # chunks run, position by position; the first token has none.
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            [None] if params.prompt_logprobs is not None and index == 0 else None
        )

    @property
    def num_prompt_logprobs_missing(self) -> int:
        """Prompt positions whose next-token logprob is still to be computed (0 without prompt logprobs)."""
        return 0 if self.prompt_logprobs is None else self.num_prompt_tokens - len(self.prompt_logprobs)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_known_tokens(self) -> int:
        return len(self.token_ids) - self.num_pending_tokens

    @property
    def num_known_output_tokens(self) -> int:
        return self.num_known_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id}#{self.index}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)}, {self.status.name})"
        )
