"""Turns a scheduled batch into packed tensors, runs the model and samples.

Owns the KV pool tensors. Per step it builds flat input ids / positions / slot
mapping / block tables on the host, ships them in one transfer per tensor, runs one
forward over every scheduled token, computes logits only for the rows that sample,
and starts copying the chosen ids back to the host. `launch` returns at once with a
PendingStep; `collect` waits for it. The engine launches step N+1 before collecting
step N, so the host's work overlaps the GPU's: a token sampled in step N that step
N+1 consumes is read straight from the device (the host only knows it as PENDING_TOKEN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from qwenserve.config import ModelConfig
from qwenserve.distributed.sharding import kv_heads_per_rank
from qwenserve.engine.block_manager import NULL_BLOCK
from qwenserve.engine.decode_graphs import DecodeGraphs
from qwenserve.engine.guided import apply_bitmask, fill_bitmask
from qwenserve.engine.penalty_state import PenaltyState
from qwenserve.engine.prefill_graphs import PrefillGraphs, graphable
from qwenserve.engine.sampler import SamplerOutput, SamplingBatch, num_candidates_for, sample
from qwenserve.engine.sampler_graphs import SamplerGraphs, param_rows
from qwenserve.engine.scheduler import ScheduledBatch
from qwenserve.engine.sequence import PENDING_TOKEN, Sequence
from qwenserve.model.ops import AttentionMetadata
from qwenserve.model.qwen3 import Ops, Qwen3ForCausalLM


def select_ops(device: torch.device, use_kernels: bool) -> Ops:
    """Triton kernels on CUDA when available, else the torch reference."""
    from qwenserve.kernels import kernel_ops, kernels_available

    if use_kernels and device.type == "cuda" and kernels_available():
        return Ops(**kernel_ops())
    return Ops()


def logit_edits(seqs: list[Sequence]) -> tuple[list[int], list[int], list[float]] | None:
    """(rows, token ids, values) to add to this step's logits, or None when no row has any: OpenAI's
    logit_bias, and -inf on the stop tokens of every row whose output is still shorter than its
    min_tokens (vLLM's semantics: they cannot be sampled yet)."""
    rows: list[int] = []
    ids: list[int] = []
    values: list[float] = []
    for row, seq in enumerate(seqs):
        if bias := seq.params.logit_bias:  # at most MAX_LOGIT_BIAS entries (SamplingParams checks)
            rows += [row] * len(bias)
            ids += bias.keys()
            values += bias.values()
        if seq.min_tokens_banned and seq.num_output_tokens < seq.params.min_tokens:
            rows += [row] * len(seq.min_tokens_banned)
            ids += seq.min_tokens_banned
            values += [-math.inf] * len(seq.min_tokens_banned)
    return (rows, ids, values) if rows else None


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, world_size: int = 1) -> int:
    """Bytes of K and V for one block across all layers (on one rank: its kv heads only)."""
    elem = torch.tensor([], dtype=dtype).element_size()
    kv_heads = kv_heads_per_rank(cfg, world_size)
    return 2 * cfg.num_hidden_layers * block_size * kv_heads * cfg.head_dim * elem


@dataclass
class StepInputs:
    """Host-side description of one step before it is copied to the device."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    query_start_loc: list[int] = field(default_factory=lambda: [0])
    context_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    logits_indices: list[int] = field(default_factory=list)
    sample_seqs: list[Sequence] = field(default_factory=list)
    pending_rows: list[int] = field(default_factory=list)  # rows whose input id is still on the device
    pending_sources: list[int] = field(default_factory=list)  # ...at these rows of the previous step's samples
    # (seq, first position, its row, count): prompt positions whose next-token logprob this step computes
    prompt_logprob_rows: list[tuple[Sequence, int, int, int]] = field(default_factory=list)
    max_query_len: int = 0
    is_decode_only: bool = False


@dataclass
class PromptLogprobs:
    """Next-token logprobs of `count` prompt positions of one sequence from `first_pos` on (the
    logprob of token first_pos + 1 + i at row i), with the top-k alternatives."""

    seq: Sequence
    first_pos: int
    # On the device as the forward makes them ([count], [count, k], [count, k]); host lists once collected.
    logprobs: torch.Tensor | list[float]
    top_logprobs: torch.Tensor | list[list[float]]
    top_ids: torch.Tensor | list[list[int]]


@dataclass
class ForwardStep:
    """A step whose forward is enqueued: the logits of the rows that sample (None when none does)
    and, on a decode or prefill graph, its greedy ids (and a decode graph's key, for the sampler graphs)."""

    inp: StepInputs
    logits: torch.Tensor | None
    greedy_ids: torch.Tensor | None = None
    graph_key: tuple[int, bool] | None = None
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)


@dataclass
class PendingStep:
    """A launched step: its sampled ids are on the device and on their way to `host`."""

    seqs: list[Sequence]
    host: dict[str, torch.Tensor] = field(default_factory=dict)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    done: torch.cuda.Event | None = None
    token_indices: list[int] = field(default_factory=list)  # where each sampled id goes in its seq's token_ids


@dataclass
class StepResult:
    """Host-side results of one step for the sequences that sampled."""

    seqs: list[Sequence]
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[float]] | None = None
    top_ids: list[list[int]] | None = None
    token_indices: list[int] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)  # host lists


# Prompt positions whose logits are materialised at once for prompt logprobs (x vocab x 4 bytes).
PROMPT_LOGPROB_ROWS = 256


class ModelRunner:
    """Owns the KV pool and runs the model on a scheduled batch: packs the step's inputs, replays the
    decode CUDA graph or runs eagerly, and samples (launch returns at once; collect waits)."""

    def __init__(
        self,
        model: Qwen3ForCausalLM,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.vocab_size = cfg.vocab_size
        shape = (num_blocks, block_size, model.num_kv_heads, cfg.head_dim)  # this rank's kv heads
        # Zero-filled: the torch reference masks unused slots, and 0 * NaN garbage would still be NaN.
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        model.bind_kv_cache(self.k_caches, self.v_caches)
        self.pin = device.type == "cuda"
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.sampler_graphs: SamplerGraphs | None = None
        self.penalties = PenaltyState(cfg.vocab_size, device)
        # Triton penalties and top-k draw; the engine turns them on with the model's kernels.
        self.sampler_kernels = False
        # The last launched step's sampled ids (device) and each sampling seq's row in them.
        self._prev_tokens: torch.Tensor | None = None
        self._prev_rows: dict[int, int] = {}

    def _to_device(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype, pin_memory=self.pin)
        return t.to(self.device, non_blocking=True)

    def _host_inputs(self, batch: ScheduledBatch) -> StepInputs:
        """Flatten the batch into host lists: one row per new token, one entry per sequence."""
        inp = StepInputs()
        bs = self.block_size
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            if seq.num_prompt_logprobs_missing:
                # Position p predicts token p + 1; positions recomputed after a preemption are skipped.
                first = max(start, len(seq.prompt_logprobs) - 1)
                last = min(end, seq.num_prompt_tokens - 1)
                if first < last:
                    inp.prompt_logprob_rows.append((seq, first, len(inp.input_ids) + first - start, last - first))
            inp.input_ids.extend(seq.token_ids[start:end])
            if inp.input_ids[-1] == PENDING_TOKEN:  # only ever the last token, sampled by the previous step
                inp.input_ids[-1] = 0
                inp.pending_rows.append(len(inp.input_ids) - 1)
                inp.pending_sources.append(self._prev_rows[seq.seq_id])
            inp.positions.extend(range(start, end))
            table = seq.block_table
            inp.slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            inp.query_start_loc.append(len(inp.input_ids))
            inp.context_lens.append(end)
            if end == seq.num_tokens:
                inp.logits_indices.append(len(inp.input_ids) - 1)
                inp.sample_seqs.append(seq)
        max_blocks = max(len(seq.block_table) for seq in batch.seqs)
        inp.block_tables = [s.block_table + [NULL_BLOCK] * (max_blocks - len(s.block_table)) for s in batch.seqs]
        inp.max_query_len = max(batch.num_new_tokens)
        inp.is_decode_only = inp.max_query_len == 1
        return inp

    def prepare(
        self, batch: ScheduledBatch, inp: StepInputs | None = None
    ) -> tuple[StepInputs, torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Model inputs on the device: (host description, ids, positions, metadata)."""
        inp = inp or self._host_inputs(batch)
        meta = AttentionMetadata(
            slot_mapping=self._to_device(inp.slot_mapping, torch.int64),
            block_tables=self._to_device(inp.block_tables, torch.int32),
            context_lens=self._to_device(inp.context_lens, torch.int32),
            query_start_loc=self._to_device(inp.query_start_loc, torch.int32),
            max_query_len=inp.max_query_len,
            max_context_len=max(inp.context_lens),
            is_decode_only=inp.is_decode_only,
            host_query_start_loc=inp.query_start_loc,
            host_context_lens=inp.context_lens,
        )
        ids = self._to_device(inp.input_ids, torch.int64)
        pos = self._to_device(inp.positions, torch.int64)
        return inp, ids, pos, meta

    def _fill_pending(self, ids: torch.Tensor, inp: StepInputs) -> None:
        """Write the ids that the previous step sampled (still on the device) into this step's inputs."""
        rows, sources = inp.pending_rows, inp.pending_sources
        if not rows:
            return
        n = len(rows)
        # Rows rise with the batch order; steady decode keeps the previous step's order too.
        if rows[-1] - rows[0] == n - 1 and sources == list(range(sources[0], sources[0] + n)):
            ids[rows[0] : rows[0] + n].copy_(self._prev_tokens[sources[0] : sources[0] + n])  # steady decode
        else:
            src = self._prev_tokens[self._to_device(sources, torch.int64)]
            ids[self._to_device(rows, torch.int64)] = src.to(ids.dtype)

    def sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        """Gather the sampling parameters of the rows that sample this step (two host-to-device copies)."""
        params = [s.params for s in seqs]
        n = len(seqs)
        floats, ints = param_rows(seqs, -(-n // 4) * 4)
        temperature, top_p, min_p, presence, frequency, repetition = self._to_device(floats, torch.float32)[:, :n]
        top_k, seeds, steps = self._to_device(ints, torch.int64)[:, :n]
        sampled = [p for p in params if not p.greedy]
        batch = SamplingBatch(
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seeds=seeds, steps=steps,
            num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=-1),
            all_greedy=not sampled,
            needs_top_k_p=any(p.top_k > 0 or p.top_p < 1 for p in sampled),
            needs_min_p=any(p.min_p > 0 for p in sampled),
            num_candidates=num_candidates_for([p.top_k for p in sampled]),
        )  # fmt: skip
        if any(p.needs_penalties for p in params):
            batch.presence_penalty, batch.frequency_penalty, batch.repetition_penalty = presence, frequency, repetition
            batch.penalty_rows = self.penalties.rows_for(seqs)
            batch.seen, batch.counts = self.penalties.seen, self.penalties.counts
        return batch

    def release(self, seq: Sequence) -> None:
        """Forget a finished sequence's per-sequence sampling state."""
        self.penalties.release(seq)

    def launch(self, batch: ScheduledBatch) -> PendingStep:
        """Enqueue the step's forward and sampling; returns without waiting for the GPU."""
        return self.sample(self.forward(batch))

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> ForwardStep:
        """Enqueue the step's forward up to the logits of the rows that sample (`sample` follows)."""
        wants_prompt_logprobs = any(s.num_prompt_logprobs_missing for s in batch.seqs)
        if self.graphs is not None and self.graphs.can_run(batch) and not wants_prompt_logprobs:
            inp = self._host_inputs(batch)
            self.graphs.load(inp)
            self._fill_pending(self.graphs.input_ids, inp)
            logits, greedy_ids = self.graphs.replay(inp)
            return ForwardStep(inp, logits, greedy_ids, self.graphs.last_key)
        inp = None
        if self.prefill_graphs is not None and graphable(batch) and not wants_prompt_logprobs:
            inp = self._host_inputs(batch)
            key = self.prefill_graphs.key(inp)
            if key is not None:
                self.prefill_graphs.load(inp)
                logits, greedy_ids = self.prefill_graphs.replay(key)
                return ForwardStep(inp, logits, greedy_ids)
        inp, ids, pos, meta = self.prepare(batch, inp)
        self._fill_pending(ids, inp)
        hidden = self.model(ids, pos, meta)
        prompt_lps = self._prompt_logprobs(hidden, inp)
        if not inp.sample_seqs:
            return ForwardStep(inp, None, prompt_logprobs=prompt_lps)
        rows = self._to_device(inp.logits_indices, torch.int64)
        return ForwardStep(inp, self.model.compute_logits(hidden[rows]), prompt_logprobs=prompt_lps)

    @torch.inference_mode()
    def sample(self, fwd: ForwardStep) -> PendingStep:
        """Enqueue the sampling of a step whose forward is enqueued; the ids start their copy to the host.

        Structured output runs it only once the previous step's tokens are processed (the matchers
        need them), so a row may belong to a sequence that has finished since: it samples on, and
        the engine drops its token."""
        logits, greedy_ids, graph_key, prompt_lps = fwd.logits, fwd.greedy_ids, fwd.graph_key, fwd.prompt_logprobs
        seqs = fwd.inp.sample_seqs
        if logits is None:
            self._prev_tokens, self._prev_rows = None, {}
            # Nothing to wait for unless prompt logprobs are on their way to the host.
            return self._start_copy_to_host([], None, prompt_lps) if prompt_lps else PendingStep(seqs=[])
        out = None
        edits = logit_edits(seqs)
        guided = [row for row, s in enumerate(seqs) if s.matcher is not None and not s.is_finished]
        if edits is not None or guided:
            # Rare (a logit_bias, min_tokens not reached yet, structured output): edit a copy and sample
            # eagerly, since the graphed sampler reads the graph's own logits.
            logits = self._edit_logits(logits, seqs, edits, guided)
            greedy_ids = graph_key = None
        if all(s.params.greedy and not s.params.needs_penalties and s.params.logprobs is None for s in seqs):
            out = SamplerOutput(token_ids=greedy_ids if greedy_ids is not None else logits.argmax(dim=-1))
        elif graph_key is not None and self.sampler_graphs is not None and self.sampler_kernels:
            out = self.sampler_graphs.sample(graph_key, self.graphs.outputs[graph_key], seqs)
        if out is None:
            sampling = self.sampling_batch(seqs)
            out = sample(logits, sampling, use_kernels=self.sampler_kernels)
            if sampling.penalty_rows is not None:
                self.penalties.record(seqs, sampling.penalty_rows, out.token_ids)
        self._prev_tokens, self._prev_rows = out.token_ids, {s.seq_id: i for i, s in enumerate(seqs)}
        return self._start_copy_to_host(seqs, out, prompt_lps)

    def _edit_logits(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        edits: tuple[list[int], list[int], list[float]] | None,
        guided: list[int],
    ) -> torch.Tensor:
        """A float32 copy of `logits` with the edits added and, in each guided row, -inf on every token
        its grammar does not allow. float32: bf16 is 0.5 apart near 100, so +100 on a set of tokens
        would tie them."""
        logits = logits.to(torch.float32, copy=True)
        if edits is not None:
            rows, ids = (self._to_device(x, torch.int64) for x in edits[:2])
            logits.index_put_((rows, ids), self._to_device(edits[2], torch.float32), accumulate=True)
        if guided:
            bitmask, too_slow = fill_bitmask([seqs[row].matcher for row in guided], logits.shape[-1], self.pin)
            for i in too_slow:  # the engine ends these once their token is back (LLMEngine._advance_grammar)
                seqs[guided[i]].grammar_too_slow = True
            apply_bitmask(logits, self._to_device(guided, torch.int64), bitmask.to(self.device, non_blocking=True))
        return logits

    def _prompt_logprobs(self, hidden: torch.Tensor, inp: StepInputs) -> list[PromptLogprobs]:
        """Log-softmax of the logits at the prompt positions that asked, in slices of PROMPT_LOGPROB_ROWS rows."""
        results = []
        for seq, first_pos, first_row, count in inp.prompt_logprob_rows:
            k = seq.params.prompt_logprobs or 0
            targets = self._to_device(seq.token_ids[first_pos + 1 : first_pos + 1 + count], torch.int64)
            chosen, top_vals, top_ids = [], [], []
            for r in range(0, count, PROMPT_LOGPROB_ROWS):
                rows = slice(first_row + r, first_row + min(count, r + PROMPT_LOGPROB_ROWS))
                logp = torch.log_softmax(self.model.compute_logits(hidden[rows]).float(), dim=-1)
                chosen.append(logp.gather(1, targets[r : r + logp.shape[0], None]).squeeze(1))
                vals, ids = logp.topk(k, dim=-1)
                top_vals.append(vals)
                top_ids.append(ids)
            results.append(PromptLogprobs(seq, first_pos, torch.cat(chosen), torch.cat(top_vals), torch.cat(top_ids)))
        return results

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """Start copying `t` to (pinned) host memory; the step's event marks when it is there."""
        if not self.pin:
            return t
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)

    def _start_copy_to_host(
        self, seqs: list[Sequence], out: SamplerOutput | None, prompt_lps: list[PromptLogprobs]
    ) -> PendingStep:
        step = PendingStep(seqs=seqs)
        for name in ("token_ids", "logprobs", "top_logprobs", "top_ids"):
            t = getattr(out, name) if out is not None else None
            if t is not None:
                step.host[name] = self._to_host(t)
        for p in prompt_lps:
            step.prompt_logprobs.append(
                PromptLogprobs(p.seq, p.first_pos, self._to_host(p.logprobs), self._to_host(p.top_logprobs),
                               self._to_host(p.top_ids))
            )  # fmt: skip
        if self.pin:
            step.done = torch.cuda.Event()
            step.done.record()
        return step

    @staticmethod
    def collect(step: PendingStep) -> StepResult:
        """Wait for a launched step's sampled ids and return them as host lists."""
        if step.done is not None:
            step.done.synchronize()
        host = step.host
        prompt_lps = [
            PromptLogprobs(p.seq, p.first_pos, p.logprobs.tolist(), p.top_logprobs.tolist(), p.top_ids.tolist())
            for p in step.prompt_logprobs
        ]
        if not step.seqs:
            return StepResult(seqs=[], token_ids=[], prompt_logprobs=prompt_lps)
        result = StepResult(
            seqs=step.seqs, token_ids=host["token_ids"].tolist(), token_indices=step.token_indices,
            prompt_logprobs=prompt_lps,
        )  # fmt: skip
        if "logprobs" in host:
            result.logprobs = host["logprobs"].tolist()
        if "top_logprobs" in host:
            result.top_logprobs = host["top_logprobs"].tolist()
            result.top_ids = host["top_ids"].tolist()
        return result

    def execute(self, batch: ScheduledBatch) -> StepResult:
        """Run one step to completion (profiling, tests)."""
        return self.collect(self.launch(batch))

    def capture_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Record CUDA graphs of the decode step (forward + logits) for a ladder of batch sizes, and of
        short prefill steps (forward + the last row's logits) for a ladder of chunk lengths."""
        max_blocks = -(-max_model_len // self.block_size)
        self.graphs = DecodeGraphs(self.model, max_num_seqs, max_blocks, self.block_size, self.device)
        self.prefill_graphs = PrefillGraphs(self.model, max_blocks, self.block_size, self.device)
        if self.sampler_kernels:
            self.sampler_graphs = SamplerGraphs(self.graphs.max_bs, self.vocab_size, self.penalties, self.device)
