"""CUDA graphs of short prefill steps: one sequence's chunk of at most PREFILL_GRAPH_SIZES[-1] new tokens
that ends its prompt, the usual shape of a conversation's next turn (a user message, a short tool result)
over its cached history. Eager, such a step enqueues its 48 layers' launches for ~20 ms on the host while its
kernels run for 10-20 ms (H200, bench/prefill_graph_probe.py: 150 new tokens over qwen-code's 17k prefix,
38.7 ms eager, 15.6 ms replayed); replayed from a graph it costs its kernels alone.

One graph per (padded chunk length, attention splits): the split count is a launch's grid, so it is part of
the recording, and it is picked from the step's real lengths as the eager step would pick it. Padded rows
write to slot 0 of the null block and are attended by no query, so they touch no live sequence.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

import torch

from qwenserve.engine.scheduler import ScheduledBatch
from qwenserve.model.ops import AttentionMetadata
from qwenserve.model.qwen3 import Qwen3ForCausalLM

if TYPE_CHECKING:
    from qwenserve.engine.model_runner import StepInputs

logger = logging.getLogger(__name__)

# Padded chunk lengths. Past ~300 new tokens the step's kernels outlast its launches (H200: 304 tokens 23.3 ms
# eager, 22.4 replayed), so longer chunks run eager.
PREFILL_GRAPH_SIZES = (32, 64, 128, 192, 256)


def padded_chunk_len(num_tokens: int) -> int | None:
    """The captured chunk length that holds `num_tokens` new tokens, or None when none does."""
    return next((size for size in PREFILL_GRAPH_SIZES if size >= num_tokens), None)


def graphable(batch: ScheduledBatch) -> bool:
    """Whether a prefill graph may run this batch: one sequence, 2..PREFILL_GRAPH_SIZES[-1] new tokens that
    end its known tokens (the step samples, and no token of it is still being sampled)."""
    if len(batch.seqs) != 1:
        return False
    seq, num_new = batch.seqs[0], batch.num_new_tokens[0]
    return 1 < num_new <= PREFILL_GRAPH_SIZES[-1] and seq.num_computed_tokens + num_new == seq.num_known_tokens == seq.num_tokens


class PrefillGraphs:
    """Static inputs and one recorded forward + last-row logits per (padded chunk length, splits)."""

    def __init__(
        self,
        model: Qwen3ForCausalLM,
        max_blocks: int,
        block_size: int,
        device: torch.device,
    ):
        from qwenserve.kernels import attention  # Triton: CUDA only

        self.attention = attention
        self.model = model
        self.num_heads = model.layers[0].self_attn.num_heads
        self.num_kv_heads = model.num_kv_heads
        n = PREFILL_GRAPH_SIZES[-1]
        self.max_context_len = max_blocks * block_size
        # ids, positions and slots share one buffer, query_start_loc / context length / last row another,
        # so a step loads with two copies (and its block table with a third).
        self.tokens = torch.zeros(3, n, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.tokens.unbind(0)
        # Each at a 16-byte boundary, as a tensor of its own would be (Triton specialises pointers on it).
        self.lens = torch.zeros(12, dtype=torch.int32, device=device)
        self.query_start_loc, self.context_lens, self.last_row = self.lens[0:2], self.lens[4:5], self.lens[8:9]
        self.block_tables = torch.zeros(1, max_blocks, dtype=torch.int32, device=device)
        # Two staging buffers each: step N+1 is loaded while step N's copies may still be queued.
        self.host_tokens = [torch.zeros(3, n, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self.host_lens = [torch.zeros(12, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        self.num_loads = 0
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self.greedy_ids: dict[tuple[int, int], torch.Tensor] = {}
        self.replays: Counter[tuple[int, int]] = Counter()  # per graph, for tests and benchmarks
        start, pool = time.perf_counter(), None
        self.query_start_loc[1] = self.context_lens[0] = 1  # a one-token sequence while capturing
        split_choices = [1, *attention.PREFILL_SPLIT_CHOICES] if attention.PREFILL_SPLITS else [1]
        for size in reversed(PREFILL_GRAPH_SIZES):
            for splits in split_choices:
                pool = self._capture(size, splits, pool)
        torch.cuda.synchronize(device)
        logger.info("captured %d prefill CUDA graphs (chunks up to %d tokens) in %.1fs", len(self.graphs), n,
                    time.perf_counter() - start)

    def _capture(self, size: int, splits: int, pool: tuple[int, int] | None) -> tuple[int, int]:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables, context_lens=self.context_lens,
            query_start_loc=self.query_start_loc, max_query_len=size, max_context_len=self.max_context_len,
            is_decode_only=False, dense_chunks=[], prefill_splits=splits,
        )  # fmt: skip
        args = (self.input_ids[:size], self.positions[:size], meta)
        self.model.compute_logits(self.model(*args))  # warm up: autotuning and lazy init stay out of the graph
        torch.cuda.synchronize(self.tokens.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            hidden = self.model(*args).index_select(0, self.last_row)
            self.logits[size, splits] = self.model.compute_logits(hidden)
            self.greedy_ids[size, splits] = self.logits[size, splits].argmax(dim=-1)
        self.graphs[size, splits] = graph
        return graph.pool()

    def load(self, inp: StepInputs) -> None:
        """Copy a graphable step's inputs (one sequence, its new tokens) into the static buffers."""
        n, context_len = len(inp.input_ids), inp.context_lens[0]
        tokens, lens = self.host_tokens[self.num_loads % 2], self.host_lens[self.num_loads % 2]
        self.num_loads += 1
        tokens.zero_()
        tokens[0, :n] = torch.tensor(inp.input_ids)
        tokens[1, :n] = torch.tensor(inp.positions)
        tokens[2, :n] = torch.tensor(inp.slot_mapping)
        lens[1], lens[4], lens[8] = n, context_len, n - 1
        self.tokens.copy_(tokens, non_blocking=True)
        self.lens.copy_(lens, non_blocking=True)
        table = torch.tensor(inp.block_tables, dtype=torch.int32, pin_memory=True)
        self.block_tables[:, : table.shape[1]].copy_(table, non_blocking=True)

    def key(self, inp: StepInputs) -> tuple[int, int] | None:
        """The graph that runs a graphable step: (padded length, the split count its eager launch would
        take), or None when that one was not captured (splits turned on after the capture)."""
        splits = self.attention.step_prefill_splits(
            inp.query_start_loc, inp.context_lens, self.num_heads, self.num_kv_heads, self.tokens.device
        )
        key = (padded_chunk_len(len(inp.input_ids)), splits)
        return key if key in self.graphs else None

    def replay(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay graph `key` for the step just loaded; returns (logits [1, vocab], their argmax [1])."""
        self.graphs[key].replay()
        self.replays[key] += 1
        return self.logits[key], self.greedy_ids[key]
