"""Batched token selection: penalties, temperature, top-k / top-p / min-p, seeded sampling, logprobs.

All rows are processed together as tensors. Randomness comes from a counter-based hash
of (request seed, output position, token id) rather than a stateful generator, so a
seeded request draws the same noise whatever else shares its batch, and a recomputed
(preempted) sequence resamples exactly what it sampled before.

Sampling works on *candidates*: the logits that can still be chosen, sorted best first.
When every sampling row has a top-k (Qwen3-Coder's generation_config asks for 20, so
qwen-code's requests always do), the candidates are just the batch's top `num_candidates`
logits from one `topk`, and everything after it touches [B, k] instead of [B, 151,936].
Otherwise the whole vocabulary is sorted (top-p alone) or used as is (plain temperature).
On CUDA the penalties, the top-k and the draw are two Triton launches
(qwenserve.kernels.sampling); this module is their reference and the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF

# Rows with a top-k up to this sample from a `topk` of the logits rather than a full sort.
MAX_CANDIDATES = 256


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
    seen: torch.Tensor | None = None  # [R, V] bool: token in the prompt or output (PenaltyState rows)
    counts: torch.Tensor | None = None  # [R, V] int32: occurrences in the output so far
    penalty_rows: torch.Tensor | None = None  # [B] int64: each row's row in `seen` / `counts`
    num_logprobs: int = -1  # max top_logprobs over rows; -1 = no row wants logprobs
    all_greedy: bool = False
    needs_top_k_p: bool = False
    needs_min_p: bool = False
    num_candidates: int = 0  # > 0: every sampling row has 0 < top_k <= this, so draw from the top this many

    @property
    def has_penalties(self) -> bool:
        return self.penalty_rows is not None and self.seen is not None and self.counts is not None


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B]
    logprobs: torch.Tensor | None = None  # [B] logprob of the chosen token
    top_logprobs: torch.Tensor | None = None  # [B, k]
    top_ids: torch.Tensor | None = None  # [B, k]


def num_candidates_for(top_ks: list[int]) -> int:
    """The `num_candidates` for sampling rows with these top-k values: their max rounded up to a
    power of two (few distinct kernel shapes), or 0 when some row has none or one too large."""
    if not top_ks or min(top_ks) <= 0 or max(top_ks) > MAX_CANDIDATES:
        return 0
    return max(16, 1 << (max(top_ks) - 1).bit_length())


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors; every product stays below 2^63."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise_at(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise for each row's (seed, step) at the given token ids ([V] or [B, K])."""
    row = _hash32((_hash32(seeds & _MASK32) + _hash32(steps & _MASK32) * 0x45D9F3B) & _MASK32)
    # 23 random bits: (bits + 0.5) / 2^23 stays below 1 in float32. With 24 the top value rounded to
    # 1.0, whose noise is +inf: about one token in 16.7 million, so ~1 % of full-vocabulary draws.
    bits = _hash32(((token_ids * 0x9E3779B1) & _MASK32) ^ row[:, None]) >> 9
    u = (bits.to(torch.float32) + 0.5) / float(1 << 23)
    return -torch.log(-torch.log(u))


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, V] that depends only on each row's (seed, step)."""
    return gumbel_noise_at(seeds, steps, torch.arange(vocab_size, device=seeds.device, dtype=torch.int64))


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """HF-style repetition penalty on seen tokens, then OpenAI frequency and presence penalties
    on output counts."""
    if not batch.has_penalties:
        return logits
    rows = batch.penalty_rows
    if batch.repetition_penalty is not None:
        rep = batch.repetition_penalty[:, None]
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(batch.seen[rows], penalised, logits)
    counts = batch.counts[rows].to(logits.dtype)
    if batch.frequency_penalty is not None:
        logits = logits - batch.frequency_penalty[:, None] * counts
    if batch.presence_penalty is not None:
        logits = logits - batch.presence_penalty[:, None] * (counts > 0).to(logits.dtype)
    return logits


def choose_from_candidates(
    values: torch.Tensor, token_ids: torch.Tensor, batch: SamplingBatch, is_sorted: bool
) -> torch.Tensor:
    """One token per row from candidate logits [B, K] and their ids [B, K].

    `is_sorted`: values run best first, which top-k / top-p need; unsorted candidates (the
    whole vocabulary, plain temperature) only get min-p. Greedy rows take the best candidate.
    """
    greedy = token_ids.gather(1, values.argmax(dim=-1, keepdim=True)).squeeze(1)
    temp = torch.where(batch.temperature > 0, batch.temperature, torch.ones_like(batch.temperature))
    scaled = values / temp[:, None]
    num = values.shape[-1]
    drop = torch.zeros_like(scaled, dtype=torch.bool)
    if is_sorted and (batch.needs_top_k_p or batch.num_candidates):
        k = torch.where(batch.top_k > 0, batch.top_k.clamp(max=num), torch.full_like(batch.top_k, num))
        drop = torch.arange(num, device=values.device)[None, :] >= k[:, None]
        probs = torch.softmax(scaled.masked_fill(drop, float("-inf")), dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first candidate always stays). top_p 1
        # keeps every candidate: a float32 cumsum can reach 1.0 before the tail (whose mass rounded
        # away), and a row must draw here what it draws unsorted, beside no top-p row.
        top_p = batch.top_p[:, None]
        drop |= ((probs.cumsum(dim=-1) - probs) >= top_p) & (top_p < 1)
    if batch.needs_min_p:
        probs = torch.softmax(scaled.masked_fill(drop, float("-inf")), dim=-1)
        drop |= probs < probs.max(dim=-1, keepdim=True).values * batch.min_p[:, None]
    noise = gumbel_noise_at(batch.seeds, batch.steps, token_ids)
    # where, not masked_fill + noise: a dropped token must lose whatever its noise (-inf + inf is NaN,
    # and argmax picks NaN).
    choice = torch.where(drop, float("-inf"), scaled + noise).argmax(dim=-1, keepdim=True)
    sampled = token_ids.gather(1, choice).squeeze(1)
    return torch.where(batch.temperature > 0, sampled, greedy)


def candidates(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(values, token ids, sorted) of the logits a row may still draw."""
    if batch.num_candidates:
        num = min(batch.num_candidates, logits.shape[-1])
        # topk picks arbitrary members of a tie group that crosses its cut (bf16 logits tie often);
        # keep the lowest ids instead, as the full sort and the CUDA kernels do, so a row draws the
        # same whichever path its batch takes: everything above the num-th value, then the
        # lowest-id ties of it (a second topk on a score that is distinct per token).
        kth = logits.topk(num, dim=-1).values[:, -1:]
        above, ties = logits > kth, logits == kth
        keep = above | (ties & (ties.cumsum(dim=-1) <= num - above.sum(dim=-1, keepdim=True)))
        order = torch.arange(logits.shape[-1], 0, -1, device=logits.device, dtype=torch.float32)
        ids = (keep * order).topk(num, dim=-1).indices.sort(dim=-1).values
        values, by_value = logits.gather(1, ids).sort(dim=-1, descending=True, stable=True)
        return values, ids.gather(1, by_value), True
    if batch.needs_top_k_p:
        values, ids = logits.sort(dim=-1, descending=True, stable=True)
        return values, ids, True
    ids = torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)
    return logits, ids, False


def sample(logits: torch.Tensor, batch: SamplingBatch, use_kernels: bool = False) -> SamplerOutput:
    """Choose one token per row of logits [B, V].

    `use_kernels` (CUDA only) runs the penalties and, when every sampling row has a small top-k,
    the whole draw as Triton kernels (qwenserve.kernels.sampling)."""
    raw_logprobs = torch.log_softmax(logits.float(), dim=-1) if batch.num_logprobs >= 0 else None
    if use_kernels and not batch.all_greedy and 0 < batch.num_candidates <= _max_kernel_candidates():
        from qwenserve.kernels.sampling import sample_top_k

        token_ids = sample_top_k(logits, batch)
    else:
        if use_kernels and batch.has_penalties:
            from qwenserve.kernels.sampling import penalize

            logits = penalize(logits, batch)
        else:
            logits = apply_penalties(logits.float(), batch)
        if batch.all_greedy:
            token_ids = logits.argmax(dim=-1)
        else:
            values, ids, is_sorted = candidates(logits, batch)
            token_ids = choose_from_candidates(values, ids, batch, is_sorted)
    out = SamplerOutput(token_ids=token_ids)
    if raw_logprobs is not None:
        out.logprobs = raw_logprobs.gather(-1, token_ids[:, None]).squeeze(-1)
        if batch.num_logprobs > 0:
            out.top_logprobs, out.top_ids = raw_logprobs.topk(batch.num_logprobs, dim=-1)
    return out


def _max_kernel_candidates() -> int:
    from qwenserve.kernels.sampling import MAX_KERNEL_CANDIDATES

    return MAX_KERNEL_CANDIDATES
