"""Paged attention kernels: flash-decoding for pure decode steps, varlen flash attention otherwise.

Both read K/V straight from the paged cache [num_blocks, block_size, num_kv_heads, head_dim]
through the block tables, and both pack the query heads that share a KV head (GQA) into the
rows of one tile, so every K/V tile is loaded once per KV head rather than once per query head.

Decode (`meta.is_decode_only`): one program per (sequence, KV head, split). The split count
depends only on the batch size, and each program finds its slice of the context from
`context_lens` on the device, so the launch is the same every step and CUDA-graph capturable.
A second small kernel merges the splits' partial outputs through their log-sum-exps.

Prefill / mixed steps: one program per (tile of query tokens of one sequence, KV head); the
grid is an upper bound (T // BLOCK_Q + B) computed from shapes, and each program finds its
sequence by binary search over `query_start_loc`, so there is no host sync either. Keys
strictly before the tile's first query position need no causal mask; only the diagonal tiles
are masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwenserve.kernels import cudnn_attention
from qwenserve.kernels.pdl import pdl_launch, pdl_start, pdl_wait
from qwenserve.model.ops import AttentionMetadata

_LOG2E = 1.4426950408889634
_NEG_BIG = tl.constexpr(
    -1.0e30
)  # finite "minus infinity" for running maxima: keeps exp2(m_old - m_new) NaN-free

# Decode tiling. TILE tokens of K and V are gathered per loop step (TILE // block_size blocks).
DECODE_TILE = 64
# Steps of at most DECODE_WIDE_TILE_MAX_SEQS sequences take 128-token tiles at long contexts: at batch 1
# -58 / -46 / -149 us per step at 4k / 16k / 32k against 64 (256 with 8 warps: +32 / +44 / +287 us);
# at 1,280 tokens, batch 8 -9 us, but batch 32 +128 us and batch 64 +343 us (bench/ab_decode.py, H200).
DECODE_WIDE_TILE = 128
DECODE_WIDE_TILE_MAX_SEQS = 8
DECODE_MAX_SPLITS = 64  # B=1 at 32k: 64 splits 37 us vs 32 splits 45 us (H100)
DECODE_NUM_WARPS = 4
# Wide-tile steps whose contexts may pass DECODE_SHORT_CONTEXT (the long-context decode graphs of small
# batches; eager steps with a long context) take 8 warps. Per step against 4 warps (bench/ab_decode.py,
# H200, three runs): at 32k -19 to -155 us at batch 1, -524 / -531 us at batch 4, -1,189 us at batch 8; at
# 4k -4 / +7 us at batch 1, -31 / -80 at batch 4, +134 at batch 8. At 512 tokens 8 warps cost +55 us at
# batch 4, so every batch on the wide tile also gets a short-context graph, which keeps 4.
DECODE_LONG_NUM_WARPS = 8
# Contexts within DECODE_SHORT_TILE x splits tokens (every split at most one tile) take the narrower
# tile: at 512 tokens and batch 1, 32-token tiles are 50 us per step faster than 64; at 32k they are
# 210 us slower (bench/tune_decode_attn.py --sweep tiles, H100). The engine captures a decode graph
# per batch size for contexts up to DECODE_SHORT_CONTEXT so both kinds of step get their tile.
DECODE_SHORT_TILE = 32
DECODE_SHORT_CONTEXT = 2048
# 2 warps for the split merge: -60 us per step at 512 and 32k context vs 1 or 4 (bench/tune_decode_attn.py, H100).
DECODE_MERGE_NUM_WARPS = 2
DECODE_NUM_STAGES = 3
# Prefill tiling: BLOCK_M rows = BLOCK_M // group query tokens x group heads.
PREFILL_BLOCK_M = 128
PREFILL_BLOCK_N = 64
PREFILL_NUM_WARPS = 8
PREFILL_NUM_STAGES = 2
# A prefill launch short of programs splits each query tile's keys between up to 8 programs
# (prefill_num_splits), each keeping at least this many keys per query row on average; a split launch costs
# ~PREFILL_SPLIT_COST times the unsplit one per wave. PREFILL_SPLITS = False turns it off (bench/ab_follow_up.py).
# Measured on the H200 only.
PREFILL_SPLIT_CHOICES = (2, 4, 8)
PREFILL_MIN_KEYS_PER_SPLIT = 512
PREFILL_SPLIT_COST = 1.2
PREFILL_SPLITS = True
# Long prefill chunks take cuDNN's attention (kernels/cudnn_attention.py; QWENSERVE_CUDNN_PREFILL=0 turns it off)
# when the step's host-side lengths are known; the rest of the step stays on Triton.
# Once a context passes ~16k tokens cuDNN is 1.5-2x faster whatever the chunk (bench/tune_prefill_attn.py
# --sweep backends, H200), but the first chunk of each new (chunk, context) shape costs ~90 ms of cuDNN graph
# building (--sweep build). A chunk goes there when its query-key pairs, q_len x (prefix + q_len / 2), are
# enough that the time saved over the model's 48 layers (~1 ns a pair) pays for that build within the
# request: 8k-token chunks over a prefix of 8k or more (a long prompt's second chunk on), or 2k new tokens
# of a 50k-token conversation.
DENSE_PREFILL_MIN_QUERY = 128
DENSE_PREFILL_MIN_PAIRS = 100_000_000
_NEVER = 2**31 - 1  # a query length no chunk reaches; int32 like the thresholds, so one compiled variant

_num_sms_cache: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _num_sms_cache:
        _num_sms_cache[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _num_sms_cache[index]


def decode_num_splits(num_seqs: int, num_kv_heads: int, num_sms: int, max_splits: int | None = None) -> int:
    """Splits per (sequence, KV head) so that the grid covers about two waves of SMs.

    A function of the batch shape only (never of context lengths), so a CUDA graph captured
    for a batch size stays valid for every later step of that size. Short contexts simply
    leave the trailing splits empty; those programs exit after writing an empty partial.
    max_splits defaults to DECODE_MAX_SPLITS read per call (an A/B in bench/ab_decode.py can set it).
    """
    max_splits = DECODE_MAX_SPLITS if max_splits is None else max_splits
    want = triton.cdiv(2 * num_sms, max(1, num_seqs * num_kv_heads))
    return max(1, min(max_splits, triton.next_power_of_2(want) if want > 1 else 1))


@triton.jit(do_not_specialize=["stride_bt"])  # block-table width changes with the longest sequence
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_P2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PDL_MODE: tl.constexpr = 0,
):
    pdl_start(PDL_MODE)
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    pdl_wait(PDL_MODE)

    ctx = tl.load(context_lens_ptr + seq)
    num_tiles = tl.cdiv(ctx, TILE)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    t_start = split * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, num_tiles)

    g = tl.arange(0, GROUP_P2)
    d = tl.arange(0, DIM_P2)
    head = kvh * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )

    m_i = tl.full([GROUP_P2], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([GROUP_P2], dtype=tl.float32)
    acc = tl.zeros([GROUP_P2, DIM_P2], dtype=tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    offs_n = tl.arange(0, TILE)
    for t in range(t_start, t_end):
        n = t * TILE + offs_n
        valid = n < ctx
        blk = tl.load(bt_row + n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv_off = blk * stride_cb + (n % BLOCK_SIZE) * stride_cs + kvh * stride_ch
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # Empty contexts (graph padding rows) and empty splits leave l_i == 0: write zeros and
    # a -inf log-sum-exp so the merge ignores them.
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    o = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + seq.to(tl.int64) * stride_ot + head[:, None] * stride_oh + d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=g_mask[:, None] & d_mask[None, :],
        )
    else:
        row = (seq * NUM_HEADS + head).to(tl.int64) * NUM_SPLITS + split  # [B, H, S] layout
        tl.store(part_out_ptr + row[:, None] * DIM_P2 + d[None, :], o, mask=g_mask[:, None])
        lse = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_mask)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_P2: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PDL_MODE: tl.constexpr = 0,
):
    pdl_start(PDL_MODE)
    pdl_wait(PDL_MODE)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, DIM_P2)
    base = (seq * NUM_HEADS + head).to(tl.int64) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + s)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # empty splits: exp2(-inf) = 0
    o = tl.load(part_out_ptr + (base + s)[:, None] * DIM_P2 + d[None, :])
    denom = tl.sum(w, 0)
    res = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(
        out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + d,
        res.to(out_ptr.dtype.element_ty),
        mask=d < HEAD_DIM,
    )


@triton.jit(do_not_specialize=["num_seqs", "stride_bt", "dense_min_query", "dense_min_pairs2"])
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    query_start_loc_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    stride_ot,
    stride_oh,
    dense_min_query,
    dense_min_pairs2,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_P2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    # Sequence i owns the virtual tile range starting at start_i // BLOCK_Q + i, which leaves
    # room for its cdiv(len_i, BLOCK_Q) tiles; find the last sequence starting at or before pid.
    # Unrolled (SEARCH_STEPS = bit length of num_seqs) so there is no data-dependent loop.
    lo = pid * 0
    hi = lo + num_seqs
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        go = first <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    seq = lo
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_tile = pid - (q_start // BLOCK_Q + seq)
    ctx = tl.load(context_lens_ptr + seq)
    if q_tile * BLOCK_Q >= q_len:
        return
    if (q_len >= dense_min_query) & (q_len.to(tl.int64) * (2 * ctx - q_len) >= dense_min_pairs2):
        return  # cuDNN attends this chunk (paged_attention): is_dense_chunk on the device
    prefix = ctx - q_len

    r = tl.arange(0, BLOCK_M)
    tok = q_tile * BLOCK_Q + r // GROUP
    head = kvh * GROUP + r % GROUP
    row_mask = (r // GROUP < BLOCK_Q) & (tok < q_len)
    pos = prefix + tok
    d = tl.arange(0, DIM_P2)
    d_mask = d < HEAD_DIM
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_mask[:, None] & d_mask[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_P2], dtype=tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    offs_n = tl.arange(0, BLOCK_N)

    first_pos = prefix + q_tile * BLOCK_Q
    kv_end = prefix + tl.minimum(q_len, (q_tile + 1) * BLOCK_Q)
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # tiles every query of the tile sees whole
    if NUM_SPLITS == 1:
        # Loop bounds the compiler sees as plainly as before splits existed: the generic ones below made
        # the unsplit kernel ~20 % slower (H200: 857 new tokens over 16k 0.88 -> 1.06 ms, a cold 8k chunk
        # 1.42 -> 1.75 ms), because a loop from a computed start is not known to be non-negative, and the
        # key index arithmetic (n // BLOCK_SIZE, n % BLOCK_SIZE) then takes the signed path;
        # tl.assume(lo >= 0) recovers it too, but not the split launches' own cost (bench/split_variants.py).
        lo = 0
        hi = full_end
        tail_start = full_end
    else:
        # Each program takes an even share of the whole tiles; the last also takes the causal tail (at
        # most two tiles).
        full_tiles = full_end // BLOCK_N
        tiles_per_split = tl.cdiv(full_tiles, NUM_SPLITS)
        lo = tl.minimum(split * tiles_per_split, full_tiles) * BLOCK_N
        hi = tl.minimum((split + 1) * tiles_per_split, full_tiles) * BLOCK_N
        tail_start = tl.where(split == NUM_SPLITS - 1, full_end, kv_end)

    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        blk = tl.load(bt_row + n // BLOCK_SIZE).to(tl.int64)
        kv_off = blk * stride_cb + (n % BLOCK_SIZE) * stride_cs + kvh * stride_ch
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=d_mask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    for start in range(tail_start, kv_end, BLOCK_N):
        n = start + offs_n
        valid = n < kv_end
        blk = tl.load(bt_row + n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv_off = blk * stride_cb + (n % BLOCK_SIZE) * stride_cs + kvh * stride_ch
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        s = tl.where((n[None, :] <= pos[:, None]) & valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    o = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=row_mask[:, None] & d_mask[None, :],
        )
    else:  # partial results in the decode kernel's [T, H, S] layout, for _decode_merge_kernel
        part = (q_rows * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * DIM_P2 + d[None, :], o, mask=row_mask[:, None])
        tl.store(part_lse_ptr + part, tl.where(has, m_i + tl.log2(l_safe), float("-inf")), mask=row_mask)


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert q.stride(2) == 1, "q needs a contiguous head_dim"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    assert q.shape[1] % k_cache.shape[2] == 0 and q.shape[2] == k_cache.shape[3]


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    max_context_len: int | None = None,
    tile: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Flash-decoding over the paged cache: one query token per sequence, q [B, H, D].

    `max_context_len`, if given, must bound every entry of `context_lens`; it picks the tile.
    """
    _check_cache(q, k_cache, v_cache)
    num_seqs, num_heads, head_dim = q.shape
    assert block_tables.shape[0] == num_seqs, "decode expects one query row per sequence"
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    dim_p2 = triton.next_power_of_2(head_dim)
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = decode_num_splits(num_seqs, num_kv_heads, _num_sms(q.device))
    assert num_splits & (num_splits - 1) == 0, "num_splits must be a power of two"
    # Module constants read per call, so bench/tune_decode_attn.py can weigh them in the decode graph.
    if tile is None and max_context_len is not None and max_context_len <= DECODE_SHORT_TILE * num_splits:
        tile = DECODE_SHORT_TILE
    if tile is None and num_seqs <= DECODE_WIDE_TILE_MAX_SEQS:
        tile = DECODE_WIDE_TILE
        if max_context_len is None or max_context_len > DECODE_SHORT_CONTEXT:
            num_warps = num_warps or DECODE_LONG_NUM_WARPS
    num_warps, num_stages = num_warps or DECODE_NUM_WARPS, num_stages or DECODE_NUM_STAGES
    tile = max(tile or DECODE_TILE, 16)
    part_out, part_lse = _split_partials(out, num_splits, dim_p2)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part_out,
        part_lse,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        NUM_HEADS=num_heads,
        GROUP=group,
        GROUP_P2=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        DIM_P2=dim_p2,
        BLOCK_SIZE=block_size,
        TILE=tile,
        NUM_SPLITS=num_splits,
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl_launch(q.device, "decode"),
    )
    if num_splits > 1:
        _merge_splits(part_out, part_lse, out, num_splits, dim_p2, **pdl_launch(q.device, "merge"))
    return out


def _split_partials(out: torch.Tensor, num_splits: int, dim_p2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 buffers for the partial results of `num_splits` programs per row and head of `out` [rows, H, D]
    and their log-sum-exps (out itself, unused, for one split)."""
    if num_splits == 1:
        return out, out
    rows = out.shape[0] * out.shape[1] * num_splits
    return (
        torch.empty(rows, dim_p2, dtype=torch.float32, device=out.device),
        torch.empty(rows, dtype=torch.float32, device=out.device),
    )


def _merge_splits(
    part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, num_splits: int, dim_p2: int, **launch: int | bool
) -> None:
    """Combine the partial results [rows, H, splits] into out [rows, H, D], each weighted by its share of
    the exp-sum."""
    num_rows, num_heads, head_dim = out.shape
    _decode_merge_kernel[(num_rows, num_heads)](
        part_out,
        part_lse,
        out,
        out.stride(0),
        out.stride(1),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        DIM_P2=dim_p2,
        NUM_SPLITS=num_splits,
        num_warps=DECODE_MERGE_NUM_WARPS,
        **launch,
    )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    block_m: int = PREFILL_BLOCK_M,
    block_n: int = PREFILL_BLOCK_N,
    num_warps: int = PREFILL_NUM_WARPS,
    num_stages: int = PREFILL_NUM_STAGES,
    dense_chunks: bool = False,
    out: torch.Tensor | None = None,
    num_splits: int = 1,
) -> torch.Tensor:
    """Varlen causal flash attention of packed queries [T, H, D] over each sequence's paged cache.

    With `dense_chunks`, the chunks that `is_dense_chunk` picks are skipped: their rows of `out` are
    left to the caller. With `num_splits` > 1 (a power of two; not with `dense_chunks`), each query tile's
    keys are shared between that many programs whose partial results a second kernel merges
    (prefill_num_splits)."""
    _check_cache(q, k_cache, v_cache)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = block_tables.shape[0]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    assert num_splits == 1 or (num_splits & (num_splits - 1) == 0 and not dense_chunks)
    block_m, block_q = prefill_tile(block_m, group)
    dim_p2 = triton.next_power_of_2(head_dim)
    part_out, part_lse = _split_partials(out, num_splits, dim_p2)
    grid = (prefill_query_tiles(num_tokens, num_seqs, block_q), num_kv_heads, num_splits)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        query_start_loc,
        out,
        part_out,
        part_lse,
        scale * _LOG2E,
        num_seqs,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        DENSE_PREFILL_MIN_QUERY if dense_chunks else _NEVER,
        2 * DENSE_PREFILL_MIN_PAIRS,
        GROUP=group,
        HEAD_DIM=head_dim,
        DIM_P2=dim_p2,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        # Fixed for up to 2047 sequences (extra steps are no-ops), so batch size never triggers a compile.
        SEARCH_STEPS=max(11, num_seqs.bit_length()),
        NUM_HEADS=num_heads,
        NUM_SPLITS=num_splits,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _merge_splits(part_out, part_lse, out, num_splits, dim_p2)
    return out


def prefill_tile(block_m: int, group: int) -> tuple[int, int]:
    """(rows, query tokens) of a prefill tile: at least one token's `group` query heads, at least 16 rows."""
    block_m = max(block_m, triton.next_power_of_2(group), 16)
    return block_m, block_m // group


def prefill_query_tiles(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Programs per KV head of a prefill launch: each sequence's query tiles (its trailing ones may be
    empty: the launch reads no lengths from the device)."""
    return num_tokens // block_q + num_seqs


def prefill_num_splits(num_programs: int, mean_keys: float, num_sms: int) -> int:
    """How many programs share each query tile's keys in a prefill launch of `num_programs` query tiles
    whose query rows see `mean_keys` keys on average.

    One program runs per SM at a time, so a launch of few programs leaves SMs idle: 300 new tokens of a
    conversation are 76 programs, one wave with 42 % of the H200's 132 SMs idle. Split keys fill them, but
    a split launch runs ~20 % slower per key (its loop bounds, the partial results it writes and merges),
    so the count is the one with the fewest waves per split, counting that cost, with at least
    PREFILL_MIN_KEYS_PER_SPLIT keys per split. On the H200 (bench/prefill_waves.py) 300 new tokens over 40k
    went from ~1.06 ms a layer unsplit to 0.75 in 8 splits, one decode row at 4k from ~0.12 to 0.03, while
    a follow-up turn's 857 tokens over 16k (216 programs, two waves) gained at most 7 % and over 4k lost."""
    if num_programs <= 0:
        return 1

    def cost(splits: int) -> float:
        waves = -(-num_programs * splits // num_sms) / splits
        return waves * (PREFILL_SPLIT_COST if splits > 1 else 1.0)

    choices = [1] + [s for s in PREFILL_SPLIT_CHOICES if mean_keys >= s * PREFILL_MIN_KEYS_PER_SPLIT]
    return min(choices, key=lambda splits: (cost(splits), splits))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Same contract as ops.paged_attention: returns [T, num_heads, head_dim] in q's dtype.

    Pure decode steps take the flash-decoding kernel (graph-capturable: nothing read from
    the host but shapes); anything else takes the varlen prefill kernel, which also serves
    the query_len-1 sequences of mixed batches, except long chunks, which cuDNN attends.
    """
    if meta.is_decode_only and q.shape[0] == meta.block_tables.shape[0]:
        return paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, max_context_len=meta.max_context_len
        )
    tables = (q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.query_start_loc, scale)
    long_chunks = _long_chunks(meta, q)
    if not long_chunks:
        return paged_prefill_attention(*tables, num_splits=_prefill_splits(q, k_cache, meta))
    out = torch.empty_like(q)
    if len(long_chunks) < meta.block_tables.shape[0]:
        paged_prefill_attention(*tables, dense_chunks=True, out=out)
    failure = _cudnn_chunks(q, k_cache, v_cache, meta, scale, long_chunks, out)
    if failure is None:
        return out
    # Outside the except: the failed attempt's tensors are freed before Triton redoes the whole step.
    meta.dense_chunks = []  # the step's other layers too
    if isinstance(failure, int):
        cudnn_attention.record_out_of_memory(failure)
    else:
        cudnn_attention.record_probe(q.shape[2], q.dtype, failure)
    return paged_prefill_attention(*tables)


def _prefill_splits(q: torch.Tensor, k_cache: torch.Tensor, meta: AttentionMetadata) -> int:
    """prefill_num_splits for this step's launch with the default tiles, decided at its first layer."""
    if meta.prefill_splits is not None:
        return meta.prefill_splits
    starts, context_lens = meta.host_query_start_loc, meta.host_context_lens
    if starts is None or context_lens is None:
        return 1
    meta.prefill_splits = step_prefill_splits(starts, context_lens, q.shape[1], k_cache.shape[2], q.device)
    return meta.prefill_splits


def step_prefill_splits(
    starts: list[int], context_lens: list[int], num_heads: int, num_kv_heads: int, device: torch.device
) -> int:
    """prefill_num_splits for a step packed as `starts` (query_start_loc) over `context_lens`, with the
    default tiles (1 when PREFILL_SPLITS is off)."""
    num_tokens = starts[-1]
    if not PREFILL_SPLITS or num_tokens == 0:
        return 1
    # keys a query row sees, summed: a chunk of n new tokens ending at ctx sees ctx - (n - 1) / 2 on average
    keys = sum((end - start) * (ctx - (end - start - 1) / 2) for start, end, ctx in zip(starts, starts[1:], context_lens, strict=False))
    block_q = prefill_tile(PREFILL_BLOCK_M, num_heads // num_kv_heads)[1]
    num_programs = prefill_query_tiles(num_tokens, len(context_lens), block_q) * num_kv_heads
    return prefill_num_splits(num_programs, keys / num_tokens, _num_sms(device))


def _cudnn_chunks(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    long_chunks: list[tuple[int, int, int, int]],
    out: torch.Tensor,
) -> int | Exception | None:
    """Attend the long chunks through cuDNN into `out`. None, or what failed: the context length whose
    contiguous copy ran out of memory, or the error of a first use that shows cuDNN cannot run here (a torch
    whose cuDNN attention op has another signature raises a TypeError or a RuntimeError)."""
    context_len = 0
    try:
        for seq, start, end, context_len in long_chunks:
            out[start:end] = cudnn_attention.chunk_attention(
                q[start:end], k_cache, v_cache, meta.block_tables[seq], context_len, scale
            )
    except torch.OutOfMemoryError:
        return context_len
    except (RuntimeError, TypeError) as exc:
        if cudnn_attention.usable(q.shape[2], q.dtype) is not None:
            raise  # it worked before: a real failure, not a missing backend
        return exc.with_traceback(None)  # its frames (the gathered K/V) are not kept for the fallback
    cudnn_attention.record_probe(q.shape[2], q.dtype, None)
    return None


def is_dense_chunk(q_len: int, context_len: int) -> bool:
    """Whether a chunk of q_len new tokens ending at context_len goes to cuDNN (the kernel's rule too)."""
    return q_len >= DENSE_PREFILL_MIN_QUERY and q_len * (2 * context_len - q_len) >= 2 * DENSE_PREFILL_MIN_PAIRS


def _long_chunks(meta: AttentionMetadata, q: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(sequence, first row, end row, context length) of the step's chunks that cuDNN attends, decided at
    the step's first layer. All or none of the chunks the rule picks: the kernel skips by the rule alone."""
    if meta.dense_chunks is not None:
        return meta.dense_chunks
    starts, context_lens = meta.host_query_start_loc, meta.host_context_lens
    if starts is None or context_lens is None or meta.max_query_len < DENSE_PREFILL_MIN_QUERY:
        return []
    chunks = []
    if cudnn_attention.usable(q.shape[2], q.dtype) is not False:
        chunks = [
            (seq, starts[seq], starts[seq + 1], context_lens[seq])
            for seq in range(len(context_lens))
            if is_dense_chunk(starts[seq + 1] - starts[seq], context_lens[seq])
        ]
    num_heads, head_dim = q.shape[1], q.shape[2]
    if not all(cudnn_attention.admits(end - start, ctx, num_heads, head_dim, q.dtype) for _, start, end, ctx in chunks):
        chunks = []
    meta.dense_chunks = chunks
    return chunks


__all__ = [
    "decode_num_splits",
    "paged_attention",
    "paged_decode_attention",
    "paged_prefill_attention",
    "prefill_num_splits",
    "step_prefill_splits",
]
