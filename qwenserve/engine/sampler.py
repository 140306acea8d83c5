"""Batched token selection: penalties, temperature, top-k / top-p / min-p, seeded sampling, logprobs.

All rows are processed together as tensors. Randomness comes from a counter-based hash
of (request seed, output position, token id) rather than a stateful generator, so a
seeded request draws the same noise whatever else shares its batch, and a recomputed
(preempted) sequence resamples exactly what it sampled before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors on the logits' device."""

    temperature: torch.Tensor  # [B] float32; 0 = greedy
    top_p: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64; 0 = off
    min_p: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] int64 in [0, 2^32)
    steps: torch.Tensor  # [B] int64: index of the token being sampled within the output
    presence_penalty: torch.Tensor | None = None  # [B]; the penalty fields are None when no row uses them
    frequency_penalty: torch.Tensor | None = None
    repetition_penalty: torch.Tensor | None = None
    output_counts: torch.Tensor | None = None  # [B, V] occurrences in the output so far
    seen_mask: torch.Tensor | None = None  # [B, V] token appears in prompt or output
    penalty_rows: torch.Tensor | None = None  # rows of the runner's PenaltyState, when penalties apply
    num_logprobs: int = -1  # max top_logprobs over rows; -1 = no row wants logprobs
    all_greedy: bool = False
    needs_top_k_p: bool = False
    needs_min_p: bool = False


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B]
    logprobs: torch.Tensor | None = None  # [B] logprob of the chosen token
    top_logprobs: torch.Tensor | None = None  # [B, k]
    top_ids: torch.Tensor | None = None  # [B, k]


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors; every product stays below 2^63."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, V] that depends only on each row's (seed, step)."""
    row = _hash32((_hash32(seeds & _MASK32) + _hash32(steps & _MASK32) * 0x45D9F3B) & _MASK32)
    cols = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _hash32(((cols * 0x9E3779B1) & _MASK32) ^ row[:, None]) >> 8  # 24 random bits
    u = (bits.to(torch.float32) + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(u))


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """OpenAI presence/frequency penalties on output counts; HF-style repetition penalty on seen tokens."""
    if batch.repetition_penalty is not None and batch.seen_mask is not None:
        rep = batch.repetition_penalty[:, None]
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(batch.seen_mask, penalised, logits)
    if batch.output_counts is not None:
        counts = batch.output_counts.to(logits.dtype)
        if batch.frequency_penalty is not None:
            logits = logits - batch.frequency_penalty[:, None] * counts
        if batch.presence_penalty is not None:
            logits = logits - batch.presence_penalty[:, None] * (counts > 0).to(logits.dtype)
    return logits


def _mask_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    cum_before = probs.cumsum(dim=-1) - probs
    drop |= cum_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Choose one token per row of float32 logits [B, V]."""
    raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.num_logprobs >= 0 else None
    logits = apply_penalties(logits, batch)
    greedy_ids = logits.argmax(dim=-1)
    if batch.all_greedy:
        token_ids = greedy_ids
    else:
        temp = torch.where(batch.temperature > 0, batch.temperature, torch.ones_like(batch.temperature))
        scaled = logits / temp[:, None]
        if batch.needs_top_k_p:
            scaled = _mask_top_k_top_p(scaled, batch.top_k, batch.top_p)
        if batch.needs_min_p:
            probs = torch.softmax(scaled, dim=-1)
            threshold = probs.max(dim=-1, keepdim=True).values * batch.min_p[:, None]
            scaled = scaled.masked_fill(probs < threshold, float("-inf"))
        noise = gumbel_noise(batch.seeds, batch.steps, logits.shape[-1])
        sampled_ids = (scaled + noise).argmax(dim=-1)
        token_ids = torch.where(batch.temperature > 0, sampled_ids, greedy_ids)
    out = SamplerOutput(token_ids=token_ids)
    if raw_logprobs is not None:
        out.logprobs = raw_logprobs.gather(-1, token_ids[:, None]).squeeze(-1)
        if batch.num_logprobs > 0:
            out.top_logprobs, out.top_ids = raw_logprobs.topk(batch.num_logprobs, dim=-1)
    return out
