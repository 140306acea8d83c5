"""CUDA graphs of the decode step: static input buffers and one recorded forward + logits per
padded batch size, so a decode step costs one graph replay instead of a few hundred launches."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from qwenserve.engine.scheduler import ScheduledBatch
from qwenserve.model.ops import AttentionMetadata
from qwenserve.model.qwen3 import Qwen3ForCausalLM

if TYPE_CHECKING:
    from qwenserve.engine.model_runner import StepInputs

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The decode batch sizes to capture: 1, 2, 4, 8, then every 8 up to 64, every 16 up to 512."""
    sizes = [1, 2, 4] + list(range(8, 65, 8)) + list(range(80, 513, 16))
    return [b for b in sizes if b < max_num_seqs] + [min(max_num_seqs, 512)]


# Batches up to this size also get a graph for short contexts, where the decode attention uses
# narrower tiles (batch 1-2) or fewer warps (up to DECODE_WIDE_TILE_MAX_SEQS; see DECODE_SHORT_CONTEXT
# and DECODE_LONG_NUM_WARPS in qwenserve.kernels.attention).
SHORT_GRAPH_MAX_BATCH = 8


def short_context_len() -> int:
    """The context bound of the short-context decode graphs."""
    from qwenserve.kernels.attention import DECODE_SHORT_CONTEXT

    return DECODE_SHORT_CONTEXT


class DecodeGraphs:
    """CUDA graphs of decode steps: static input buffers, one graph per padded batch size, and for
    the smallest batches a second one for when every context is short (the attention kernel then
    takes narrower tiles: more splits with work, less latency per split).

    Padded rows write to slot 0 of the null block and read one token of it, so they cost
    almost nothing and touch no live sequence. Every kernel on this path reads its sizes
    from device tensors, which is what lets one recorded launch serve every step.
    """

    def __init__(self, model: Qwen3ForCausalLM, max_num_seqs: int, max_blocks: int, block_size: int, device: torch.device):
        from qwenserve.kernels.pdl import prime_pdl  # Triton: CUDA only

        self.prime_pdl = prime_pdl
        self.model = model
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_bs = self.sizes[-1]
        self.max_blocks = max_blocks
        n = self.max_bs
        # ids, positions, slots and context lengths share one buffer so one copy loads them all.
        self.packed = torch.zeros(4, n, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping, self.context_lens = self.packed.unbind(0)
        self.context_lens.fill_(1)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        # Two staging buffers: step N+1 is loaded while step N's copies may still be queued.
        self.host = [torch.zeros(4, n, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self.num_loads = 0
        self.max_context_len = max_blocks * block_size
        self.short_context_len = min(short_context_len(), self.max_context_len)
        # Keyed by (padded batch size, whether every context is within short_context_len).
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self.greedy_ids: dict[tuple[int, bool], torch.Tensor] = {}  # each graph's argmax, computed inside it
        self.last_key: tuple[int, bool] | None = None  # the graph replayed last (benchmarks replay it alone)
        start = time.perf_counter()
        pool = None
        variants = [(bs, False) for bs in self.sizes] + [(bs, True) for bs in self.sizes if bs <= SHORT_GRAPH_MAX_BATCH]
        for bs, short in reversed(variants):
            meta = self._meta(bs, self.short_context_len if short else self.max_context_len)
            args = (self.input_ids[:bs], self.positions[:bs], meta)
            model.compute_logits(model(*args))  # warm up: autotuning and lazy init stay out of the graph
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs, short] = model.compute_logits(model(*args))
                self.greedy_ids[bs, short] = self.outputs[bs, short].argmax(dim=-1)
            pool = graph.pool()
            self.graphs[bs, short] = graph
        torch.cuda.synchronize(device)
        logger.info("captured %d decode CUDA graphs (batch 1..%d) in %.1fs", len(variants), n, time.perf_counter() - start)

    def _meta(self, bs: int, max_context_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            context_lens=self.context_lens[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            max_query_len=1,
            max_context_len=max_context_len,
            is_decode_only=True,
        )

    def can_run(self, batch: ScheduledBatch) -> bool:
        """Whether a captured graph can run this batch: decode only, within the largest size."""
        return len(batch.seqs) <= self.max_bs and all(n == 1 for n in batch.num_new_tokens)

    def padded_size(self, n: int) -> int:
        """The smallest captured batch size that holds `n` sequences."""
        return next(size for size in self.sizes if size >= n)

    def key(self, inp: StepInputs) -> tuple[int, bool]:
        """Which graph runs this step: (padded batch size, every context short)."""
        bs = self.padded_size(len(inp.input_ids))
        return bs, bs <= SHORT_GRAPH_MAX_BATCH and max(inp.context_lens) <= self.short_context_len

    def load(self, inp: StepInputs) -> None:
        """Copy a decode step's inputs into the static buffers of the graph that will run it."""
        n = len(inp.input_ids)
        bs = self.padded_size(n)
        host = self.host[self.num_loads % 2]
        self.num_loads += 1
        host[:, n:bs] = 0
        host[0, :n] = torch.tensor(inp.input_ids)
        host[1, :n] = torch.tensor(inp.positions)
        host[2, :n] = torch.tensor(inp.slot_mapping)
        host[3, :n] = torch.tensor(inp.context_lens)
        host[3, n:bs] = 1
        # Straight from pinned memory into the graph's static inputs: one DMA of the whole (small)
        # buffer, rows past bs included, rather than four copies of [:bs].
        self.packed.copy_(host, non_blocking=True)
        tables = torch.tensor(inp.block_tables, dtype=torch.int32, pin_memory=True)
        self.block_tables[:n, : tables.shape[1]].copy_(tables, non_blocking=True)
        if bs > n:
            self.block_tables[n:bs, 0] = 0

    def replay(self, inp: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the graph for the step just loaded; returns (logits [n, vocab], their argmax [n])."""
        key, n = self.key(inp), len(inp.input_ids)
        self.last_key = key
        self.prime_pdl(self.packed)
        self.graphs[key].replay()
        return self.outputs[key][:n], self.greedy_ids[key][:n]
