"""The sampler as two launches (CUDA) for the common case, every sampling row with a top-k:
pass one splits each row's vocabulary into slices, applies the penalties and keeps each slice's
top k; pass two takes the row's top k of those, applies top-k / top-p / min-p and temperature
and draws with the seeded Gumbel noise. In torch this is a [B, V] topk (radix select, ~0.3 ms
at batch 1) and ~60 small kernels. `penalize` alone serves the other cases. Same results as
qwenserve.engine.sampler's torch path, up to float rounding in exp / log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:  # the engine's batch type, for annotations only: kernels do not import the engine
    from qwenserve.engine.sampler import SamplingBatch

PENALTY_BLOCK = 4096


@triton.jit
def _penalised(x, b, offs, mask, rows_ptr, seen_ptr, counts_ptr, rep_ptr, freq_ptr, pres_ptr, stride_state):
    """Row b's logits x at vocabulary offsets `offs` after the repetition, frequency and presence
    penalties, in the order of qwenserve.engine.sampler.apply_penalties."""
    row = tl.load(rows_ptr + b).to(tl.int64)
    seen = tl.load(seen_ptr + row * stride_state + offs, mask=mask, other=0) != 0
    count = tl.load(counts_ptr + row * stride_state + offs, mask=mask, other=0).to(tl.float32)
    rep = tl.load(rep_ptr + b)
    x = tl.where(seen, tl.where(x > 0, tl.math.div_rn(x, rep), x * rep), x)
    x = x - tl.load(freq_ptr + b) * count
    return x - tl.load(pres_ptr + b) * tl.where(count > 0, 1.0, 0.0)


@triton.jit
def _penalty_kernel(
    logits_ptr,
    out_ptr,
    rows_ptr,
    seen_ptr,
    counts_ptr,
    rep_ptr,
    freq_ptr,
    pres_ptr,
    vocab,
    stride_logits,
    stride_state,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < vocab
    x = tl.load(logits_ptr + b.to(tl.int64) * stride_logits + offs, mask=mask, other=0.0).to(tl.float32)
    x = _penalised(x, b, offs, mask, rows_ptr, seen_ptr, counts_ptr, rep_ptr, freq_ptr, pres_ptr, stride_state)
    tl.store(out_ptr + b.to(tl.int64) * stride_logits + offs, x, mask=mask)


def _penalty_values(batch: SamplingBatch, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(repetition, frequency, presence) per row, neutral where the batch leaves one out."""
    dev = batch.temperature.device
    rep = batch.repetition_penalty if batch.repetition_penalty is not None else torch.ones(rows, device=dev)
    freq = batch.frequency_penalty if batch.frequency_penalty is not None else torch.zeros(rows, device=dev)
    pres = batch.presence_penalty if batch.presence_penalty is not None else torch.zeros(rows, device=dev)
    return rep, freq, pres


def penalize(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition, frequency and presence penalties of logits [B, V] (a new float32 tensor)."""
    rows, vocab = logits.shape
    logits = logits.contiguous()
    out = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
    grid = (rows, triton.cdiv(vocab, PENALTY_BLOCK))
    _penalty_kernel[grid](
        logits, out, batch.penalty_rows, batch.seen.view(torch.uint8), batch.counts,
        *_penalty_values(batch, rows), vocab, logits.stride(0), batch.seen.stride(0), BLOCK=PENALTY_BLOCK,
    )  # fmt: skip
    return out


@triton.jit
def _hash32(x):
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


# Keys that sort like (value, -token id): a float32's bits made order-preserving as a signed int in
# the high word, the complemented id in the low word, so one integer top-k carries both and ties
# go to the lower id (as argmax does). SENTINEL pads past the vocabulary and sorts below everything.
SENTINEL = tl.constexpr(-0x7FFFFFFFFFFFFFFF)
TOPK_CHUNK = 4096  # vocabulary slice per program of the first pass
TOPK_NUM_WARPS = 8  # picked in the graph (bench/profile_sampler.py --sweep): 27 µs at batch 1 on the H100
MAX_KERNEL_CANDIDATES = 64  # the second pass holds chunks * candidates keys in one program


@triton.jit
def _sort_key(x, ids):
    bits = x.to(tl.int32, bitcast=True)
    high = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (high.to(tl.int64) << 32) | (0xFFFFFFFF - ids)


@triton.jit
def _key_value(key):
    high = (key >> 32).to(tl.int32)
    return tl.where(high >= 0, high, high ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _chunk_top_k_kernel(
    logits_ptr,
    keys_ptr,
    rows_ptr,
    seen_ptr,
    counts_ptr,
    rep_ptr,
    freq_ptr,
    pres_ptr,
    vocab,
    stride_logits,
    stride_state,
    HAS_PENALTIES: tl.constexpr,
    K: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """First pass: each program takes one slice of a row's vocabulary, applies the penalties and
    writes the slice's top K keys."""
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < vocab
    x = tl.load(logits_ptr + b.to(tl.int64) * stride_logits + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_PENALTIES:
        x = _penalised(x, b, offs, mask, rows_ptr, seen_ptr, counts_ptr, rep_ptr, freq_ptr, pres_ptr, stride_state)
    keys = tl.where(mask, _sort_key(x, offs.to(tl.int64)), SENTINEL)
    top = tl.topk(keys, K)
    out = keys_ptr + (b * tl.num_programs(1) + chunk).to(tl.int64) * K + tl.arange(0, K)
    tl.store(out, top)


@triton.jit
def _top_k_draw_kernel(
    keys_ptr,
    out_ptr,
    temp_ptr,
    top_k_ptr,
    top_p_ptr,
    min_p_ptr,
    seed_ptr,
    step_ptr,
    num_keys,
    K: tl.constexpr,
    KEYS_BLOCK: tl.constexpr,
    USE_MIN_P: tl.constexpr,
):
    """Second pass: a row's top K over its slices' keys, then top-k / top-p / min-p, temperature
    and the seeded Gumbel draw of qwenserve.engine.sampler."""
    b = tl.program_id(0)
    o = tl.arange(0, KEYS_BLOCK)
    keys = tl.load(keys_ptr + b.to(tl.int64) * num_keys + o, mask=o < num_keys, other=SENTINEL)
    top = tl.topk(keys, K)  # best first
    offs = tl.arange(0, K)
    valid = top != SENTINEL
    ids = 0xFFFFFFFF - (top & 0xFFFFFFFF)
    values = tl.where(valid, _key_value(top), -float("inf"))
    t = tl.load(temp_ptr + b)
    scaled = tl.math.div_rn(values, tl.where(t > 0, t, 1.0))
    k = tl.load(top_k_ptr + b)
    keep = valid & (offs < tl.where(k > 0, k, K))
    # top-p: keep the smallest prefix whose probability mass reaches top_p (1: all, as the torch path).
    x = tl.where(keep, scaled, -float("inf"))
    e = tl.exp(x - tl.max(x, 0))
    probs = e / tl.sum(e, 0)
    p = tl.load(top_p_ptr + b)
    keep = keep & ((tl.cumsum(probs, 0) - probs) < tl.where(p < 1.0, p, float("inf")))
    if USE_MIN_P:
        x = tl.where(keep, scaled, -float("inf"))
        e = tl.exp(x - tl.max(x, 0))
        probs = e / tl.sum(e, 0)
        keep = keep & (probs >= tl.max(probs, 0) * tl.load(min_p_ptr + b))
    # Gumbel noise from the (seed, step, token id) hash of qwenserve.engine.sampler.gumbel_noise_at.
    seed = tl.load(seed_ptr + b).to(tl.int64) & 0xFFFFFFFF
    step = tl.load(step_ptr + b).to(tl.int64) & 0xFFFFFFFF
    row = _hash32((_hash32(seed) + _hash32(step) * 0x45D9F3B) & 0xFFFFFFFF)
    bits = _hash32(((ids * 0x9E3779B1) & 0xFFFFFFFF) ^ row) >> 9  # 23 bits: u < 1 in float32
    u = (bits.to(tl.float32) + 0.5) / 8388608.0
    score = tl.where(keep, scaled - tl.log(-tl.log(u)), -float("inf"))
    choice = tl.argmax(score, 0)
    sampled = tl.sum(tl.where(offs == choice, ids, 0), 0)
    greedy = tl.sum(tl.where(offs == 0, ids, 0), 0)
    tl.store(out_ptr + b, tl.where(t > 0, sampled, greedy))


def num_top_k_keys(rows: int, vocab: int, k: int) -> int:
    """Size of the int64 scratch of sample_top_k's first pass."""
    return rows * triton.cdiv(vocab, TOPK_CHUNK) * k


def sample_top_k(
    logits: torch.Tensor, batch: SamplingBatch, keys: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row of logits [B, V] (any float dtype) when every sampling row has a top-k of at
    most batch.num_candidates <= MAX_KERNEL_CANDIDATES: penalties, a two-pass top-k and the draw,
    in two launches. `keys` (num_top_k_keys(...) int64) and `out` ([B] int64) may be given, so a
    CUDA graph of this call allocates nothing."""
    rows, vocab = logits.shape
    k = batch.num_candidates
    chunks = triton.cdiv(vocab, TOPK_CHUNK)
    if keys is None:
        keys = torch.empty(num_top_k_keys(rows, vocab, k), dtype=torch.int64, device=logits.device)
    pen = batch.has_penalties
    if pen:
        state = (batch.penalty_rows, batch.seen.view(torch.uint8), batch.counts, *_penalty_values(batch, rows))
    else:
        state = (logits,) * 6  # never read
    _chunk_top_k_kernel[(rows, chunks)](
        logits, keys, *state, vocab, logits.stride(0), batch.seen.stride(0) if pen else 0,
        HAS_PENALTIES=pen, K=k, CHUNK=TOPK_CHUNK, num_warps=TOPK_NUM_WARPS,
    )  # fmt: skip
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _top_k_draw_kernel[(rows,)](
        keys, out, batch.temperature, batch.top_k, batch.top_p, batch.min_p, batch.seeds, batch.steps,
        chunks * k, K=k, KEYS_BLOCK=triton.next_power_of_2(chunks * k), USE_MIN_P=batch.needs_min_p,
    )  # fmt: skip
    return out
