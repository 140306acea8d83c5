"""CUDA graphs of the Triton sampler, replayed on a decode graph's logits.

qwen-code sends no sampling fields, so every one of its steps samples with the model's defaults
(top-k 20, top-p 0.8, temperature 0.7, a repetition penalty): the two sampler launches follow
every decode graph. Here they are captured too, one graph per decode graph and sampling mode
(candidate count, penalties, min-p), the first time a step needs that pair; each step only
copies its rows' parameters into static buffers. A penalised graph also marks the sampled tokens
in the penalty rows, so such a step launches nothing after it: done as four eager launches after
the graph, that cost ~110 us of host time a step, and after the process's first cuDNN prefill
those steps ran ~8% slower (bench/after_cudnn.py).
Steps the kernels cannot take (logprobs, no top-k or a large one) keep the eager sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenserve.engine.penalty_state import SHARED_ROW, PenaltyState
from qwenserve.engine.sampler import SamplerOutput, SamplingBatch, num_candidates_for
from qwenserve.engine.sequence import Sequence

# Neutral values for the rows a padded graph samples but nobody reads: greedy, no penalty.
_PAD_FLOATS = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # temperature, top_p, min_p, presence, frequency, repetition
_PAD_INTS = (0, 0, 0)  # top_k, seed, step (padded penalty rows use SHARED_ROW)


def param_rows(seqs: list[Sequence], width: int) -> tuple[list[list[float]], list[list[int]]]:
    """Each sampling row's parameters as (6 float rows, 3 int rows), padded to `width` entries
    with neutral values. A width that is a multiple of 4 keeps every row 16-byte aligned: Triton
    specialises pointers on that, so a new batch size must not mean a new compile."""
    params = [s.params for s in seqs]
    floats = [[0.0 if p.greedy else p.temperature for p in params], [p.top_p for p in params],
              [p.min_p for p in params], [p.presence_penalty for p in params],
              [p.frequency_penalty for p in params], [p.repetition_penalty for p in params]]  # fmt: skip
    ints = [[p.top_k for p in params], [s.seed for s in seqs], [s.num_output_tokens for s in seqs]]
    pad = width - len(seqs)
    floats = [row + [value] * pad for row, value in zip(floats, _PAD_FLOATS, strict=True)]
    ints = [row + [value] * pad for row, value in zip(ints, _PAD_INTS, strict=True)]
    return floats, ints


@dataclass(frozen=True)
class SamplerMode:
    """What a sampler graph was captured for (the host-side switches of sample_top_k)."""

    num_candidates: int
    has_penalties: bool
    needs_min_p: bool


def sampler_mode(seqs: list[Sequence], max_candidates: int) -> SamplerMode | None:
    """The graph mode of a step's sampling rows, or None when the graphed kernels (which draw from
    at most `max_candidates` candidates) cannot take it."""
    params = [s.params for s in seqs]
    sampled = [p for p in params if not p.greedy]
    if not sampled or any(p.logprobs is not None for p in params):
        return None
    k = num_candidates_for([p.top_k for p in sampled])
    if not 0 < k <= max_candidates:
        return None
    return SamplerMode(k, any(p.needs_penalties for p in params), any(p.min_p > 0 for p in sampled))


class SamplerGraphs:
    """Static parameter buffers, one output buffer and the captured sampler graphs of one ModelRunner.

    Every graph writes its tokens to the same `out` rows: a step's tokens are read (copied to the host
    and into the next step's inputs) by operations queued before the next sampler graph runs.
    """

    def __init__(self, max_batch: int, vocab_size: int, penalties: PenaltyState, device: torch.device):
        from qwenserve.kernels.sampling import MAX_KERNEL_CANDIDATES, num_top_k_keys

        self.max_candidates = MAX_KERNEL_CANDIDATES
        self.width = -(-max_batch // 4) * 4
        self.vocab_size = vocab_size
        self.penalties = penalties
        self.floats = torch.zeros(6, self.width, dtype=torch.float32, device=device)
        self.ints = torch.zeros(4, self.width, dtype=torch.int64, device=device)  # top_k, seed, step, penalty row
        # Two staging buffers each: step N+1 is loaded while step N's copies may still be queued.
        self.host_floats = [torch.zeros(6, self.width, dtype=torch.float32, pin_memory=True) for _ in range(2)]
        self.host_ints = [torch.zeros(4, self.width, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self.num_loads = 0
        self.keys = torch.empty(num_top_k_keys(max_batch, vocab_size, MAX_KERNEL_CANDIDATES), dtype=torch.int64,
                                device=device)
        self.out = torch.zeros(self.width, dtype=torch.int64, device=device)
        self.graphs: dict[tuple[tuple[int, bool], SamplerMode], torch.cuda.CUDAGraph] = {}
        self.generation = penalties.generation

    def sample(self, graph_key: tuple[int, bool], logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput | None:
        """Sample the first len(seqs) rows of a decode graph's static logits [bs, V] through a sampler
        graph; None (nothing done) when the step needs the eager sampler."""
        mode = sampler_mode(seqs, self.max_candidates)
        if mode is None:
            return None
        n = len(seqs)
        width = -(-logits.shape[0] // 4) * 4  # the graph reads rows [0, bs); the rest keep old values
        floats, ints = param_rows(seqs, width)
        rows = self.penalties.row_indices(seqs) if mode.has_penalties else [SHARED_ROW] * n
        ints.append(rows + [SHARED_ROW] * (width - n))
        if self.penalties.generation != self.generation:  # row_indices grew (moved) the penalty buffers
            self.graphs.clear()
            self.generation = self.penalties.generation
        host_floats, host_ints = self.host_floats[self.num_loads % 2], self.host_ints[self.num_loads % 2]
        self.num_loads += 1
        host_floats[:, :width] = torch.tensor(floats)
        host_ints[:, :width] = torch.tensor(ints)
        # Whole buffers: one small DMA each, straight from pinned memory.
        self.floats.copy_(host_floats, non_blocking=True)
        self.ints.copy_(host_ints, non_blocking=True)
        key = (graph_key, mode)
        graph = self.graphs.get(key)
        if graph is None:
            self.graphs[key] = self._capture(logits, mode)  # its warm-up run sampled this step already
        else:
            graph.replay()
        if mode.has_penalties:
            self.penalties.count_recorded(seqs)  # the graph marked the tokens in the penalty rows
        return SamplerOutput(token_ids=self.out[:n])

    def _batch(self, rows: int, mode: SamplerMode) -> SamplingBatch:
        temperature, top_p, min_p, presence, frequency, repetition = self.floats[:, :rows]
        top_k, seeds, steps, penalty_rows = self.ints[:, :rows]
        batch = SamplingBatch(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seeds=seeds, steps=steps,
                              needs_top_k_p=True, needs_min_p=mode.needs_min_p, num_candidates=mode.num_candidates)
        if mode.has_penalties:
            batch.presence_penalty, batch.frequency_penalty, batch.repetition_penalty = presence, frequency, repetition
            batch.penalty_rows, batch.seen, batch.counts = penalty_rows, self.penalties.seen, self.penalties.counts
        return batch

    def _capture(self, logits: torch.Tensor, mode: SamplerMode) -> torch.cuda.CUDAGraph:
        from qwenserve.kernels.sampling import num_top_k_keys, sample_top_k

        rows = logits.shape[0]
        batch = self._batch(rows, mode)
        keys = self.keys[: num_top_k_keys(rows, self.vocab_size, mode.num_candidates)]

        def sample_and_record() -> None:
            sample_top_k(logits, batch, keys=keys, out=self.out[:rows])
            if mode.has_penalties:  # padded rows use SHARED_ROW, whose contents never matter
                self.penalties.record_on_device(batch.penalty_rows, self.out[:rows])

        # Run once outside the capture: it compiles what is new and samples this step for real.
        sample_and_record()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            sample_and_record()
        return graph
