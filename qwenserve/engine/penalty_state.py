"""Per-sequence token statistics for penalties, kept on the device and updated incrementally.

Repetition, presence and frequency penalties need, for every sampling row, which tokens
the sequence has seen and how often each appeared in its output. Rebuilding that from
the token list each step costs a host-to-device copy of the whole context (20k ids for
a qwen-code prompt) per step; instead each sequence gets a row in two [rows, vocab]
buffers, filled once when it first needs penalties and bumped with one batched
index_add per step.

A sequence without penalties that shares a batch with one that has them uses the
scratch row SHARED_ROW: its penalties are neutral, so what that row holds never matters,
and it needs no per-sequence state (which it could not build anyway while its newest
token is still in flight on the device).
"""

from __future__ import annotations

import torch

from qwenserve.engine.sequence import Sequence

SHARED_ROW = 0


class PenaltyState:
    """The per-sequence seen / output-count rows described above, with their row assignment."""

    def __init__(self, vocab_size: int, device: torch.device, initial_rows: int = 8):
        self.vocab_size = vocab_size
        self.device = device
        self.seen = torch.zeros(initial_rows, vocab_size, dtype=torch.bool, device=device)
        self.counts = torch.zeros(initial_rows, vocab_size, dtype=torch.int32, device=device)
        self.row_of: dict[int, int] = {}  # seq_id -> row
        self.num_tokens_of: dict[int, int] = {}  # seq_id -> tokens already accounted for
        self.free_rows = list(range(initial_rows - 1, SHARED_ROW, -1))
        self.generation = 0  # bumped when the buffers are reallocated (CUDA graphs hold their addresses)

    def _grow(self) -> None:
        self.generation += 1
        old = self.seen.shape[0]
        extra = old
        self.seen = torch.cat([self.seen, self.seen.new_zeros(extra, self.vocab_size)])
        self.counts = torch.cat([self.counts, self.counts.new_zeros(extra, self.vocab_size)])
        self.free_rows.extend(range(old + extra - 1, old - 1, -1))

    def _ids(self, ids: list[int]) -> torch.Tensor:
        # Pinned: a copy from pageable memory waits for the GPU to go idle first, which would
        # serialise the host's work for step N+1 behind step N (that cost 20% of decode speed).
        pin = self.device.type == "cuda"
        return torch.tensor(ids, dtype=torch.int64, pin_memory=pin).to(self.device, non_blocking=True)

    def rows_for(self, seqs: list[Sequence]) -> torch.Tensor:
        """Row index of each sequence (on the device), bringing every row up to date with its tokens."""
        return self._ids(self.row_indices(seqs))

    def row_indices(self, seqs: list[Sequence]) -> list[int]:
        """Row index of each sequence, bringing every row up to date with its tokens."""
        rows = []
        for seq in seqs:
            if not seq.params.needs_penalties or seq.is_finished:  # finished: a row whose token is dropped
                rows.append(SHARED_ROW)
                continue
            row = self.row_of.get(seq.seq_id)
            if row is None:
                if not self.free_rows:
                    self._grow()
                row = self.free_rows.pop()
                self.row_of[seq.seq_id] = row
                self.seen[row].zero_()
                self.counts[row].zero_()
                self.num_tokens_of[seq.seq_id] = seq.num_prompt_tokens
                self.seen[row].index_fill_(0, self._ids(seq.token_ids[: seq.num_prompt_tokens]), True)
            done = self.num_tokens_of[seq.seq_id]
            if done < seq.num_tokens:  # tokens appended since the last update (normally none)
                new = self._ids(seq.token_ids[done:])
                self.seen[row].index_fill_(0, new, True)
                self.counts[row].index_put_((new,), torch.ones_like(new, dtype=torch.int32), accumulate=True)
                self.num_tokens_of[seq.seq_id] = seq.num_tokens
            rows.append(row)
        return rows

    def record(self, seqs: list[Sequence], rows: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Account for the tokens just sampled for `seqs` (still on the device)."""
        self.record_on_device(rows, token_ids)
        self.count_recorded(seqs)

    def record_on_device(self, rows: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Mark token_ids[i] seen and counted in row rows[i]: device work only, which a CUDA graph may
        capture (the sampler graphs do, so a penalised step launches nothing more)."""
        # index_fill_ / index_add_ rather than `seen[...] = True`: that form copies the scalar from
        # pageable memory, which waits for the GPU and serialised overlapped steps.
        flat = rows * self.vocab_size + token_ids
        self.seen.view(-1).index_fill_(0, flat, True)
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=self.counts.dtype))

    def count_recorded(self, seqs: list[Sequence]) -> None:
        """The host's side of record: each sequence's row now accounts for one more token."""
        for seq in seqs:
            if seq.seq_id in self.num_tokens_of:
                self.num_tokens_of[seq.seq_id] += 1

    def release(self, seq: Sequence) -> None:
        """Give `seq`'s token-count row back to the pool."""
        row = self.row_of.pop(seq.seq_id, None)
        if row is not None:
            self.num_tokens_of.pop(seq.seq_id, None)
            self.free_rows.append(row)
