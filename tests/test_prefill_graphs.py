"""Which steps the prefill CUDA graphs take (the graphs themselves run in tests/gpu/test_engine_gpu.py)."""

from __future__ import annotations

import pytest

from qwenserve.engine.prefill_graphs import PREFILL_GRAPH_SIZES, graphable, padded_chunk_len
from qwenserve.engine.sampling_params import SamplingParams
from qwenserve.engine.scheduler import ScheduledBatch
from qwenserve.engine.sequence import PENDING_TOKEN, Sequence


def _batch(*chunks: tuple[int, int, int]) -> ScheduledBatch:
    """One sequence per (prompt length, tokens already computed, new tokens this step)."""
    batch = ScheduledBatch()
    for i, (prompt_len, computed, num_new) in enumerate(chunks):
        seq = Sequence(f"r{i}", 0, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=4), seed=0)
        seq.num_computed_tokens = computed
        batch.add(seq, num_new)
    return batch


@pytest.mark.parametrize(("num_tokens", "padded"), [(1, 32), (32, 32), (33, 64), (129, 192), (256, 256), (257, None)])
def test_padded_chunk_len(num_tokens: int, padded: int | None) -> None:
    assert padded_chunk_len(num_tokens) == padded


def test_graphable_steps() -> None:
    longest = PREFILL_GRAPH_SIZES[-1]
    assert graphable(_batch((5000, 4992, 8)))  # a short turn over its cached history
    assert graphable(_batch((40, 0, 40)))  # a short cold prompt
    assert graphable(_batch((longest + 100, 100, longest)))
    assert not graphable(_batch((longest + 1, 0, longest + 1)))  # too long: eager
    assert not graphable(_batch((5000, 4999, 1)))  # one token: the decode graphs' shape
    assert not graphable(_batch((5000, 4000, 200)))  # a chunk that does not end the prompt samples nothing
    assert not graphable(_batch((40, 0, 40), (30, 0, 30)))  # two sequences: a mixed step
    pending = _batch((40, 0, 40))
    pending.seqs[0].token_ids[-1] = PENDING_TOKEN  # its last token still being sampled
    pending.seqs[0].num_pending_tokens = 1
    assert not graphable(pending)
