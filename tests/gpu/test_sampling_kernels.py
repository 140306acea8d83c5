"""The Triton penalties and top-k draw against the torch sampler (CUDA)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from qwenserve.engine.sampler import SamplingBatch, num_candidates_for, sample  # noqa: E402

DEVICE = "cuda"


def _batch(rows: int, vocab: int, gen: torch.Generator, penalties: bool, min_p: bool) -> SamplingBatch:
    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen).to(DEVICE)

    batch = SamplingBatch(
        temperature=rand(rows) + 0.3,
        top_p=rand(rows) * 0.9 + 0.1,
        top_k=torch.randint(1, 60, (rows,), generator=gen).to(DEVICE),
        min_p=rand(rows) * 0.2,
        seeds=torch.randint(0, 2**32, (rows,), generator=gen).to(DEVICE),
        steps=torch.randint(0, 5000, (rows,), generator=gen).to(DEVICE),
        needs_top_k_p=True,
        needs_min_p=min_p,
        num_candidates=num_candidates_for([60]),
    )
    batch.temperature[::5] = 0.0  # greedy rows in the same batch
    if penalties:
        state_rows = rows + 3
        batch.seen = (torch.rand(state_rows, vocab, generator=gen) < 0.3).to(DEVICE)
        batch.counts = torch.randint(0, 3, (state_rows, vocab), generator=gen, dtype=torch.int32).to(DEVICE)
        batch.penalty_rows = torch.randperm(state_rows, generator=gen)[:rows].to(DEVICE)
        batch.repetition_penalty = rand(rows) + 0.8
        batch.frequency_penalty = rand(rows) - 0.5
        batch.presence_penalty = rand(rows) - 0.5
    return batch


@pytest.mark.parametrize("rows", [1, 7, 256])
@pytest.mark.parametrize("penalties", [False, True])
@pytest.mark.parametrize("min_p", [False, True])
def test_kernel_sampler_matches_torch(rows: int, penalties: bool, min_p: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    vocab = 151_936
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(DEVICE)
    batch = _batch(rows, vocab, gen, penalties, min_p)
    want = sample(logits, batch).token_ids
    got = sample(logits, batch, use_kernels=True).token_ids
    # exp / log round differently in Triton; a flip needs two candidates within an ulp.
    assert (want != got).sum().item() <= max(1, rows // 100)
    assert len(set(got.tolist())) > rows // 2


@pytest.mark.parametrize("top_k", [1, 64, 200])
def test_kernel_sampler_top_k_bounds(top_k: int) -> None:
    """top-k 1 is greedy; 200 is past the kernels' candidates, so penalties run alone then torch draws."""
    gen = torch.Generator().manual_seed(top_k)
    rows, vocab = 33, 151_936
    logits = (torch.randn(rows, vocab, generator=gen) * 2).to(torch.bfloat16).to(DEVICE)
    batch = _batch(rows, vocab, gen, penalties=True, min_p=False)
    batch.top_k.fill_(top_k)
    batch.num_candidates = num_candidates_for([top_k])
    want = sample(logits, batch).token_ids
    got = sample(logits, batch, use_kernels=True).token_ids
    assert (want != got).sum().item() <= 1
    if top_k == 1:
        assert torch.equal(got, want)


def test_kernel_penalties_match_torch() -> None:
    from qwenserve.engine.sampler import apply_penalties
    from qwenserve.kernels.sampling import penalize

    gen = torch.Generator().manual_seed(1)
    rows, vocab = 9, 70_000
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(DEVICE)
    batch = _batch(rows, vocab, gen, penalties=True, min_p=False)
    torch.testing.assert_close(penalize(logits, batch), apply_penalties(logits, batch), atol=1e-5, rtol=1e-6)
