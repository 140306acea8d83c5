"""Turns a scheduled batch into packed tensors, runs the model and samples.

Owns the KV pool tensors. Per step it builds flat input ids / positions / slot
mapping / block tables on the host, ships them in one transfer per tensor, runs one
forward over every scheduled token, computes logits only for the rows that sample,
and returns the chosen ids (one host sync per step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenserve.config import ModelConfig
from qwenserve.engine.block_manager import NULL_BLOCK
from qwenserve.engine.sampler import SamplerOutput, SamplingBatch, sample
from qwenserve.engine.scheduler import ScheduledBatch
from qwenserve.engine.sequence import Sequence
from qwenserve.model.ops import AttentionMetadata
from qwenserve.model.qwen3 import Qwen3ForCausalLM


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one block across all layers."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


@dataclass
class StepResult:
    """Host-side results of one step for the sequences that sampled."""

    seqs: list[Sequence]
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[float]] | None = None
    top_ids: list[list[int]] | None = None


class ModelRunner:
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
        self.cfg = cfg
        self.block_size = block_size
        self.device = device
        self.vocab_size = cfg.vocab_size
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        # Zero-filled: the torch reference masks unused slots, and 0 * NaN garbage would still be NaN.
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        model.bind_kv_cache(self.k_caches, self.v_caches)
        self.pin = device.type == "cuda"

    def _to_device(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype, pin_memory=self.pin)
        return t.to(self.device, non_blocking=True)

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[Sequence]]:
        """Flatten the batch into model inputs; returns (ids, positions, metadata, logits rows, sampling seqs)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        query_start_loc = [0]
        context_lens: list[int] = []
        logits_indices: list[int] = []
        sample_seqs: list[Sequence] = []
        bs = self.block_size
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start_loc.append(len(input_ids))
            context_lens.append(end)
            if end == seq.num_tokens:
                logits_indices.append(len(input_ids) - 1)
                sample_seqs.append(seq)
        max_blocks = max(len(seq.block_table) for seq in batch.seqs)
        block_tables = [s.block_table + [NULL_BLOCK] * (max_blocks - len(s.block_table)) for s in batch.seqs]
        meta = AttentionMetadata(
            slot_mapping=self._to_device(slot_mapping, torch.int64),
            block_tables=self._to_device(block_tables, torch.int32),
            context_lens=self._to_device(context_lens, torch.int32),
            query_start_loc=self._to_device(query_start_loc, torch.int32),
            max_query_len=max(batch.num_new_tokens),
            max_context_len=max(context_lens),
            is_decode_only=all(n == 1 for n in batch.num_new_tokens),
        )
        ids = self._to_device(input_ids, torch.int64)
        pos = self._to_device(positions, torch.int64)
        return ids, pos, meta, logits_indices, sample_seqs

    def sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        """Gather the sampling parameters of the rows that sample this step."""
        params = [s.params for s in seqs]
        f32 = torch.float32
        batch = SamplingBatch(
            temperature=self._to_device([p.temperature if not p.greedy else 0.0 for p in params], f32),
            top_p=self._to_device([p.top_p for p in params], f32),
            top_k=self._to_device([p.top_k for p in params], torch.int64),
            min_p=self._to_device([p.min_p for p in params], f32),
            seeds=self._to_device([s.seed for s in seqs], torch.int64),
            steps=self._to_device([s.num_output_tokens for s in seqs], torch.int64),
            num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=-1),
            all_greedy=all(p.greedy for p in params),
            needs_top_k_p=any(p.top_k > 0 or p.top_p < 1 for p in params if not p.greedy),
            needs_min_p=any(p.min_p > 0 for p in params if not p.greedy),
        )
        if any(p.needs_penalties for p in params):
            self._add_penalties(batch, seqs)
        return batch

    def _add_penalties(self, batch: SamplingBatch, seqs: list[Sequence]) -> None:
        rows = len(seqs)
        counts = torch.zeros(rows, self.vocab_size, dtype=torch.int32, device=self.device)
        seen = torch.zeros(rows, self.vocab_size, dtype=torch.bool, device=self.device)
        for row, seq in enumerate(seqs):
            if not seq.params.needs_penalties:
                continue
            out_ids = self._to_device(seq.output_token_ids, torch.int64)
            counts[row].scatter_add_(0, out_ids, torch.ones_like(out_ids, dtype=torch.int32))
            seen[row, self._to_device(seq.token_ids, torch.int64)] = True
        params = [s.params for s in seqs]
        batch.output_counts = counts
        batch.seen_mask = seen
        batch.presence_penalty = self._to_device([p.presence_penalty for p in params], torch.float32)
        batch.frequency_penalty = self._to_device([p.frequency_penalty for p in params], torch.float32)
        batch.repetition_penalty = self._to_device([p.repetition_penalty for p in params], torch.float32)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        ids, pos, meta, logits_indices, sample_seqs = self.prepare(batch)
        hidden = self.model(ids, pos, meta)
        if not sample_seqs:
            return StepResult(seqs=[], token_ids=[])
        rows = torch.tensor(logits_indices, device=self.device)
        logits = self.model.compute_logits(hidden[rows]).float()
        out = sample(logits, self.sampling_batch(sample_seqs))
        return self._to_host(sample_seqs, out)

    @staticmethod
    def _to_host(seqs: list[Sequence], out: SamplerOutput) -> StepResult:
        result = StepResult(seqs=seqs, token_ids=out.token_ids.tolist())
        if out.logprobs is not None:
            result.logprobs = out.logprobs.tolist()
        if out.top_logprobs is not None:
            result.top_logprobs = out.top_logprobs.tolist()
            result.top_ids = out.top_ids.tolist()
        return result
