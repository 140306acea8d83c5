"""The sampler's two hot steps as single launches (CUDA): the penalties over the whole
vocabulary, and the draw from each row's top-k candidates. In torch they are ~15 and ~50
small kernels a step (the noise hash alone is ~40 integer ops), which at batch 1 cost more
than the attention of a layer. Same results as qwenserve.engine.sampler's torch path, up to
float rounding in exp / log.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwenserve.engine.sampler import SamplingBatch

PENALTY_BLOCK = 4096


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
    row = tl.load(rows_ptr + b).to(tl.int64)
    rep = tl.load(rep_ptr + b)
    freq = tl.load(freq_ptr + b)
    pres = tl.load(pres_ptr + b)
    x = tl.load(logits_ptr + b.to(tl.int64) * stride_logits + offs, mask=mask, other=0.0)
    seen = tl.load(seen_ptr + row * stride_state + offs, mask=mask, other=0) != 0
    count = tl.load(counts_ptr + row * stride_state + offs, mask=mask, other=0).to(tl.float32)
    penalised = tl.where(x > 0, tl.math.div_rn(x, rep), x * rep)
    x = tl.where(seen, penalised, x)
    x = x - freq * count
    x = x - pres * tl.where(count > 0, 1.0, 0.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_logits + offs, x, mask=mask)


def penalize(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition, frequency and presence penalties of float32 logits [B, V] (a new tensor)."""
    rows, vocab = logits.shape
    ones, zeros = torch.ones(rows, device=logits.device), torch.zeros(rows, device=logits.device)
    rep = batch.repetition_penalty if batch.repetition_penalty is not None else ones
    freq = batch.frequency_penalty if batch.frequency_penalty is not None else zeros
    pres = batch.presence_penalty if batch.presence_penalty is not None else zeros
    logits = logits.contiguous()
    out = torch.empty_like(logits)
    grid = (rows, triton.cdiv(vocab, PENALTY_BLOCK))
    _penalty_kernel[grid](
        logits, out, batch.penalty_rows, batch.seen.view(torch.uint8), batch.counts,
        rep, freq, pres, vocab, logits.stride(0), batch.seen.stride(0), BLOCK=PENALTY_BLOCK,
    )  # fmt: skip
    return out


@triton.jit
def _hash32(x):
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _top_k_draw_kernel(
    values_ptr,
    ids_ptr,
    out_ptr,
    temp_ptr,
    top_k_ptr,
    top_p_ptr,
    min_p_ptr,
    seed_ptr,
    step_ptr,
    num,
    stride_values,
    stride_ids,
    BLOCK: tl.constexpr,
    USE_MIN_P: tl.constexpr,
):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    valid = offs < num
    values = tl.load(values_ptr + b * stride_values + offs, mask=valid, other=-float("inf"))
    ids = tl.load(ids_ptr + b * stride_ids + offs, mask=valid, other=0).to(tl.int64)
    t = tl.load(temp_ptr + b)
    scaled = tl.math.div_rn(values, tl.where(t > 0, t, 1.0))
    k = tl.load(top_k_ptr + b)
    keep = valid & (offs < tl.where(k > 0, tl.minimum(k, num), num))
    # top-p: keep the smallest prefix (values are sorted) whose probability mass reaches top_p.
    x = tl.where(keep, scaled, -float("inf"))
    e = tl.exp(x - tl.max(x, 0))
    probs = e / tl.sum(e, 0)
    keep = keep & ((tl.cumsum(probs, 0) - probs) < tl.load(top_p_ptr + b))
    if USE_MIN_P:
        x = tl.where(keep, scaled, -float("inf"))
        e = tl.exp(x - tl.max(x, 0))
        probs = e / tl.sum(e, 0)
        keep = keep & (probs >= tl.max(probs, 0) * tl.load(min_p_ptr + b))
    # Gumbel noise from the (seed, step, token id) hash of qwenserve.engine.sampler.gumbel_noise_at.
    seed = tl.load(seed_ptr + b).to(tl.int64) & 0xFFFFFFFF
    step = tl.load(step_ptr + b).to(tl.int64) & 0xFFFFFFFF
    row = _hash32((_hash32(seed) + _hash32(step) * 0x45D9F3B) & 0xFFFFFFFF)
    bits = _hash32(((ids * 0x9E3779B1) & 0xFFFFFFFF) ^ row) >> 8
    u = (bits.to(tl.float32) + 0.5) / 16777216.0
    score = tl.where(keep, scaled - tl.log(-tl.log(u)), -float("inf"))
    choice = tl.argmax(score, 0)
    sampled = tl.sum(tl.where(offs == choice, ids, 0), 0)
    greedy = tl.load(ids_ptr + b * stride_ids).to(tl.int64)  # sorted: the first candidate is the argmax
    tl.store(out_ptr + b, tl.where(t > 0, sampled, greedy))


def choose_from_top_k(values: torch.Tensor, token_ids: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """One token per row from its top candidates (values [B, K] sorted best first, ids [B, K])."""
    rows, num = values.shape
    out = torch.empty(rows, dtype=torch.int64, device=values.device)
    _top_k_draw_kernel[(rows,)](
        values, token_ids, out, batch.temperature, batch.top_k, batch.top_p, batch.min_p,
        batch.seeds, batch.steps, num, values.stride(0), token_ids.stride(0),
        BLOCK=triton.next_power_of_2(num), USE_MIN_P=batch.needs_min_p,
    )  # fmt: skip
    return out
