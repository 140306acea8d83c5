"""Fused mixture-of-experts: align (sort token-expert pairs by expert) + two grouped GEMMs.

Pipeline for hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], top-k routing:
1. align: the T*k (token, expert) pairs are grouped by expert, each expert's run padded to
   a multiple of BLOCK_M, giving `sorted_ids` (pair index per row, sentinel T*k for padding),
   `expert_ids` (expert of each BLOCK_M-row block) and `num_rows` (rows used, on device).
   A one-launch Triton kernel (a program per expert) up to 48k pairs, torch sort ops above;
   neither syncs with the host, and buffer sizes depend only on T, so the whole op is
   CUDA-graph capturable.
2. GEMM1: for each row block, gather the tokens' hidden rows and multiply by the block's
   expert gate and up rows in the same program, applying SiLU(gate) * up in the epilogue, so
   only the [rows, I] activation is written (not the [rows, 2I] gate_up).
3. GEMM2: the activation rows (contiguous, already in sorted order) times w2[e], scaled by
   the pair's routing weight and written to the pair's row of [T*k, H]; a sum over k ends it.

Every touched expert's weights are streamed once per (row block, column block), so a decode
batch reads close to the minimum: the touched experts' bytes.

For large prefill chunks `torch._grouped_mm` (CUTLASS on SM90) may be faster: see
`moe_configs.GROUPED_MM_MIN_TOKENS`. For decode-sized steps `routed_moe` also folds the
router's softmax/top-k into the align launch, and `norm_routed_moe` runs the norm, the router
GEMV, the routing and the align as one launch; at one or two tokens both GEMMs route the tokens
themselves (no align: one row block per token-expert pair) and the router's launch only norms and
computes the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qwenserve.kernels import moe_configs
from qwenserve.kernels.fused import add_rms_norm, route, row_topk, softmax_topk
from qwenserve.kernels.moe_configs import MoEConfig, get_moe_config
from qwenserve.kernels.pdl import pdl_launch, pdl_start, pdl_wait

# The align kernel (one program per expert, each scanning all pairs) is used up to this many
# pairs; above it the torch sort path (more launches, but it scans the pairs once) takes over.
# H100: Triton 2.5 us at 8 pairs, 36 us at 16k, 90 us at 32k, 174 us at 64k; torch ~145 us.
ALIGN_TRITON_MAX_PAIRS = 48 * 1024


@triton.jit
def _expert_run(counts, bins, expert, BLOCK_M: tl.constexpr):
    """From the pair count of every expert (`counts` over `bins`): where `expert`'s run of rows
    starts, how many pairs it holds, its length padded to BLOCK_M, and the rows all runs use."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    mine = bins == expert
    my_padded = tl.sum(tl.where(mine, padded, 0), 0)
    my_start = tl.sum(tl.where(mine, ends, 0), 0) - my_padded
    my_count = tl.sum(tl.where(mine, counts, 0), 0)
    return my_start, my_count, my_padded, tl.sum(padded, 0)


# Token counts change every step: specialising on their divisibility would compile a new
# variant in the middle of serving, so only the tile sizes (constexprs) pick variants.
@triton.jit(do_not_specialize=["numel"])
def _moe_align_kernel(
    topk_ids_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_rows_ptr,
    numel,
    NUM_EXPERTS: tl.constexpr,
    E_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # One program per expert. Each recomputes the (cheap, L2-resident) histogram of all
    # pairs to find where its padded run starts, then places its own pairs in order: no
    # cross-program dependency, so one launch and no atomics.
    expert = tl.program_id(0)
    bins = tl.arange(0, E_P2)
    offs = tl.arange(0, CHUNK)
    counts = tl.zeros([E_P2], dtype=tl.int32)
    for start in range(0, numel, CHUNK):
        i = start + offs
        ids = tl.load(topk_ids_ptr + i, mask=i < numel, other=0).to(tl.int32)
        counts += tl.histogram(ids, E_P2, mask=i < numel)
    my_start, my_count, my_padded, num_rows = _expert_run(counts, bins, expert, BLOCK_M)
    if expert == 0:
        tl.store(num_rows_ptr, num_rows)

    # This expert's pairs, in pair order, at my_start + rank.
    run = my_start
    for start in range(0, numel, CHUNK):
        i = start + offs
        ids = tl.load(topk_ids_ptr + i, mask=i < numel, other=-1).to(tl.int32)
        hit = (ids == expert).to(tl.int32)
        tl.store(sorted_ids_ptr + run + tl.cumsum(hit, 0) - 1, i, mask=hit != 0)
        run += tl.sum(hit, 0)

    # Padding rows (fewer than BLOCK_M) get the sentinel, and each of its blocks its id.
    pad = tl.arange(0, BLOCK_M)
    tl.store(sorted_ids_ptr + my_start + my_count + pad, numel, mask=my_count + pad < my_padded)
    first_block = my_start // BLOCK_M
    for b in range(0, my_padded // BLOCK_M, CHUNK):
        blk = b + offs
        tl.store(expert_ids_ptr + first_block + blk, expert, mask=blk < my_padded // BLOCK_M)


# Steps of up to this many tokens route and align in one launch (`routed_moe`): every program
# of the align recomputes the softmax top-k of all the tokens' router logits (at most 16 x E
# floats) rather than waiting for a separate routing launch.
ROUTE_ALIGN_MAX_TOKENS = 16
# Warps by token count, measured in the batch-1..16 decode graphs (bench/tune_decode_moe.py, H100):
# one warp keeps the top-k reductions in-warp (-44 us per step at batch 1), more pay off from 4 tokens.
ROUTE_ALIGN_NUM_WARPS = {1: 1, 2: 2}


@triton.jit(do_not_specialize=["num_tokens"])
def _route_align_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_rows_ptr,
    num_tokens,
    stride_l,
    NUM_EXPERTS: tl.constexpr,
    E_P2: tl.constexpr,
    TOP_K: tl.constexpr,
    T_P2: tl.constexpr,
    NB_P2: tl.constexpr,
    RENORM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    expert = tl.program_id(0)
    t = tl.arange(0, T_P2)
    e = tl.arange(0, E_P2)
    k_idx = tl.arange(0, TOP_K)
    t_ok = t < num_tokens
    e_ok = e < NUM_EXPERTS
    # Softmax over experts and top-k per token, as _router_topk_kernel does for one row.
    logit = tl.load(
        logits_ptr + t[:, None].to(tl.int64) * stride_l + e[None, :],
        mask=t_ok[:, None] & e_ok[None, :],
        other=float("-inf"),
    ).to(tl.float32)
    top_w, top_i = softmax_topk(logit, t_ok, e, e_ok, T_P2, E_P2, TOP_K, RENORM)
    pair_ok = t_ok[:, None] & (k_idx[None, :] < TOP_K)
    if expert == 0:
        pair_2d = t[:, None] * TOP_K + k_idx[None, :]
        tl.store(weights_ptr + pair_2d, top_w.to(weights_ptr.dtype.element_ty), mask=pair_ok)
        tl.store(ids_ptr + pair_2d, top_i, mask=pair_ok)

    # The align of _moe_align_kernel over the pairs t * TOP_K + k (row-major flattening).
    ids = tl.reshape(top_i, [T_P2 * TOP_K])
    valid = tl.reshape(pair_ok.to(tl.int32), [T_P2 * TOP_K]) != 0
    counts = tl.histogram(ids, E_P2, mask=valid)
    my_start, my_count, my_padded, num_rows = _expert_run(counts, e, expert, BLOCK_M)
    if expert == 0:
        tl.store(num_rows_ptr, num_rows)
    hit = ((ids == expert) & valid).to(tl.int32)
    pair = tl.arange(0, T_P2 * TOP_K)
    tl.store(sorted_ids_ptr + my_start + tl.cumsum(hit, 0) - 1, pair, mask=hit != 0)
    pad = tl.arange(0, BLOCK_M)
    tl.store(sorted_ids_ptr + my_start + my_count + pad, num_tokens * TOP_K, mask=my_count + pad < my_padded)
    blk = tl.arange(0, NB_P2)
    tl.store(expert_ids_ptr + my_start // BLOCK_M + blk, expert, mask=blk < my_padded // BLOCK_M)


def route_align(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, block_m: int, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """router_topk and moe_align in one launch, for at most ROUTE_ALIGN_MAX_TOKENS tokens.

    Returns (weights [T, k] out_dtype, ids [T, k] int32, sorted_ids, expert_ids, num_rows) with
    the contracts of router_topk and moe_align.
    """
    num_tokens, num_experts = router_logits.shape
    assert 0 < num_tokens <= ROUTE_ALIGN_MAX_TOKENS and top_k & (top_k - 1) == 0
    device = router_logits.device
    numel = num_tokens * top_k
    rows = triton.cdiv(max_sorted_rows(numel, num_experts, block_m), block_m) * block_m
    weights = torch.empty(num_tokens, top_k, dtype=out_dtype, device=device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    sorted_ids = torch.empty(rows, dtype=torch.int32, device=device)
    expert_ids = torch.empty(rows // block_m, dtype=torch.int32, device=device)
    num_rows = torch.empty(1, dtype=torch.int32, device=device)
    t_p2 = triton.next_power_of_2(num_tokens)
    _route_align_kernel[(num_experts,)](
        router_logits, weights, ids, sorted_ids, expert_ids, num_rows, num_tokens, router_logits.stride(0),
        NUM_EXPERTS=num_experts, E_P2=triton.next_power_of_2(num_experts), TOP_K=top_k, T_P2=t_p2,
        NB_P2=triton.next_power_of_2(triton.cdiv(t_p2 * top_k, block_m)), RENORM=renormalize, BLOCK_M=block_m,
        num_warps=ROUTE_ALIGN_NUM_WARPS.get(t_p2, 4),
    )  # fmt: skip
    return weights, ids, sorted_ids, expert_ids, num_rows


@triton.jit
def _align_pairs(
    ids, valid, numel, e, sorted_ids_ptr, expert_ids_ptr, num_rows_ptr, P: tl.constexpr, E_P2: tl.constexpr,
    NB_P2: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """moe_align of `numel` pairs in one program: ids [P] is each pair's expert, `valid` marks the
    real pairs, e = arange(E_P2). Same outputs as _moe_align_kernel for the rows below num_rows."""
    counts = tl.histogram(ids, E_P2, mask=valid)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    num_rows = tl.sum(padded, 0)
    tl.store(num_rows_ptr, num_rows)
    # A pair's row: its expert's run start plus the number of earlier pairs of that expert.
    p = tl.arange(0, P)
    earlier = (ids[:, None] == ids[None, :]) & (p[None, :] < p[:, None]) & valid[None, :]
    rank = tl.sum(earlier.to(tl.int32), 1)
    start = tl.sum(tl.where(ids[:, None] == e[None, :], starts[None, :], 0), 1)
    tl.store(sorted_ids_ptr + start + rank, p, mask=valid)
    # A block's expert is the run holding its first row (empty runs end at or before it, so they
    # count among the runs passed); rows of the run past its pairs get the sentinel.
    b = tl.arange(0, NB_P2)
    first = b * BLOCK_M
    used = first < num_rows
    blk_expert = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32), 1)
    tl.store(expert_ids_ptr + b, blk_expert, mask=used)
    mine = e[None, :] == blk_expert[:, None]
    blk_start = tl.sum(tl.where(mine, starts[None, :], 0), 1)
    blk_count = tl.sum(tl.where(mine, counts[None, :], 0), 1)
    rows = first[:, None] + tl.arange(0, BLOCK_M)[None, :]
    tl.store(sorted_ids_ptr + rows, numel, mask=used[:, None] & (rows - blk_start[:, None] >= blk_count[:, None]))


@triton.jit(do_not_specialize=["num_tokens"])
def _norm_route_align_kernel(
    x_ptr,
    res_ptr,
    norm_w_ptr,
    gate_ptr,
    out_ptr,
    res_out_ptr,
    logits_ptr,
    counter_ptr,
    weights_ptr,
    ids_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_rows_ptr,
    num_tokens,
    stride_x,
    stride_xk,
    stride_r,
    stride_g,
    eps,
    TERMS: tl.constexpr,
    N: tl.constexpr,
    N_P2: tl.constexpr,
    NUM_EXPERTS: tl.constexpr,
    E_P2: tl.constexpr,
    BLOCK_E: tl.constexpr,
    TOP_K: tl.constexpr,
    T_P2: tl.constexpr,
    NB_P2: tl.constexpr,
    RENORM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ROUTE: tl.constexpr,
    PDL_MODE: tl.constexpr = 0,
):
    pdl_start(PDL_MODE)
    # Program (token, expert block): the token's residual add + RMSNorm (every program of the token
    # redoes it: 2 x N values from L2, cheaper than a launch) and its router logits for BLOCK_E experts.
    row = tl.program_id(0).to(tl.int64)
    eb = tl.program_id(1)
    c = tl.arange(0, N_P2)
    c_ok = c < N
    e_blk = eb * BLOCK_E + tl.arange(0, BLOCK_E)
    e_blk_ok = e_blk < NUM_EXPERTS
    dt = res_ptr.dtype.element_ty
    # The gate slice is loaded first so its latency overlaps the norm.
    gate = tl.load(
        gate_ptr + e_blk[:, None] * stride_g + c[None, :], mask=e_blk_ok[:, None] & c_ok[None, :], other=0.0
    )
    w = tl.load(norm_w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    pdl_wait(PDL_MODE)
    x = tl.zeros([N_P2], dtype=tl.float32)
    for k in tl.static_range(TERMS):  # o_proj's split-K terms (linear_unreduced), summed here
        x += tl.load(x_ptr + row * stride_x + k * stride_xk + c, mask=c_ok, other=0.0).to(tl.float32)
    x = x.to(dt).to(tl.float32)
    r = tl.load(res_ptr + row * stride_r + c, mask=c_ok, other=0.0).to(tl.float32)
    s = (x + r).to(dt)  # rounded as in _add_rms_norm_kernel and the reference
    sf = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(sf * sf, 0) / N + eps)
    y = ((sf * rstd).to(dt).to(tl.float32) * w).to(dt)
    if eb == 0:
        tl.store(res_out_ptr + row * N + c, s, mask=c_ok)
        tl.store(out_ptr + row * N + c, y, mask=c_ok)
    logit = tl.sum(gate.to(tl.float32) * y.to(tl.float32)[None, :], 1)
    # Rounded to the activation dtype, as the reference's F.linear returns them.
    tl.store(logits_ptr + row * NUM_EXPERTS + e_blk, logit.to(logits_ptr.dtype.element_ty), mask=e_blk_ok)

    if ROUTE:
        _route_align_last(
            logits_ptr, counter_ptr, weights_ptr, ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_rows_ptr, num_tokens,
            NUM_EXPERTS, E_P2, TOP_K, T_P2, NB_P2, RENORM, BLOCK_M,
        )  # fmt: skip


@triton.jit
def _route_align_last(
    logits_ptr, counter_ptr, weights_ptr, ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_rows_ptr, num_tokens,
    NUM_EXPERTS: tl.constexpr, E_P2: tl.constexpr, TOP_K: tl.constexpr, T_P2: tl.constexpr, NB_P2: tl.constexpr,
    RENORM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """The tail of _norm_route_align_kernel: the program that finishes last routes and aligns every token.
    All the logits were stored before their programs' (release) increments, which its (acquire) one observes."""
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if done == num_tokens * tl.num_programs(1) - 1:
        tl.store(counter_ptr, 0)  # every program has counted: reset for the next launch
        t = tl.arange(0, T_P2)
        e = tl.arange(0, E_P2)
        t_ok = t < num_tokens
        e_ok = e < NUM_EXPERTS
        logits = tl.load(
            logits_ptr + t[:, None] * NUM_EXPERTS + e[None, :],
            mask=t_ok[:, None] & e_ok[None, :],
            other=float("-inf"),
            cache_modifier=".cg",  # from L2, where the other programs' stores are
        ).to(tl.float32)
        top_w, top_i = softmax_topk(logits, t_ok, e, e_ok, T_P2, E_P2, TOP_K, RENORM)
        k_idx = tl.arange(0, TOP_K)
        pair_ok = t_ok[:, None] & (k_idx[None, :] < TOP_K)
        pair_2d = t[:, None] * TOP_K + k_idx[None, :]
        tl.store(weights_ptr + pair_2d, top_w.to(weights_ptr.dtype.element_ty), mask=pair_ok)
        tl.store(ids_ptr + pair_2d, top_i, mask=pair_ok)
        ids = tl.reshape(top_i, [T_P2 * TOP_K])
        valid = tl.reshape(pair_ok.to(tl.int32), [T_P2 * TOP_K]) != 0
        _align_pairs(
            ids, valid, num_tokens * TOP_K, e, sorted_ids_ptr, expert_ids_ptr, num_rows_ptr, T_P2 * TOP_K, E_P2,
            NB_P2, BLOCK_M,
        )  # fmt: skip


# Experts per program of the fused norm + router (E / BLOCK_E programs per token).
NORM_ROUTE_BLOCK_E = 4
NORM_ROUTE_NUM_WARPS = 4
# Without the routing tail (1-2 tokens: GEMM1 routes) 8 warps: -16 us per batch-1 step at 512
# context, -106 at 32k (bench/ab_decode.py, H200, with PDL).
NORM_ONLY_NUM_WARPS = 8
# False: decode steps run add_rms_norm, the router GEMV and route_align as three launches (A/B switch).
NORM_ROUTE_FUSED = True

_launch_counters: dict[torch.device, torch.Tensor] = {}


def _launch_counter(device: torch.device) -> torch.Tensor:
    """A zeroed int32 on the device that a kernel's last program resets. One per device serves
    every launch: launches on the engine's stream never overlap. Allocated once, so the CUDA
    graphs that captured its address stay valid."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _launch_counters:
        _launch_counters[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _launch_counters[device]


def norm_route_align(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    gate_weight: torch.Tensor,
    top_k: int,
    renormalize: bool,
    block_m: int,
    route: bool = True,
) -> tuple[torch.Tensor, ...]:
    """add_rms_norm, the router GEMV and route_align in one launch, for at most ROUTE_ALIGN_MAX_TOKENS tokens
    (x [T, H], or unreduced terms [T, S, H] that the norm sums first).

    Returns (normed [T, H], new residual [T, H], routing weights [T, k] in the residual's dtype, expert ids
    [T, k] int32, sorted_ids, expert_ids, num_rows) with the contracts of add_rms_norm, router_topk and
    moe_align; with route=False only (normed, new residual, router logits [T, E] in the residual's dtype):
    the norm and the GEMV.
    """
    num_tokens, hidden = residual.shape
    terms = x.shape[1] if x.dim() == 3 else 1
    num_experts = gate_weight.shape[0]
    assert 0 < num_tokens <= ROUTE_ALIGN_MAX_TOKENS and top_k & (top_k - 1) == 0
    assert x.stride(-1) == 1 and residual.stride(1) == 1 and gate_weight.stride(1) == 1
    device = x.device
    out = torch.empty_like(residual)
    res_out = torch.empty_like(residual)
    logits = torch.empty(num_tokens, num_experts, dtype=residual.dtype, device=device)
    weights = torch.empty(num_tokens, top_k, dtype=residual.dtype, device=device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    rows = triton.cdiv(max_sorted_rows(num_tokens * top_k, num_experts, block_m), block_m) * block_m
    sorted_ids = torch.empty(rows, dtype=torch.int32, device=device)
    expert_ids = torch.empty(rows // block_m, dtype=torch.int32, device=device)
    num_rows = torch.empty(1, dtype=torch.int32, device=device)
    t_p2 = triton.next_power_of_2(num_tokens)
    # Sized by the token bucket, not the count, so each bucket compiles once.
    max_blocks = triton.cdiv(max_sorted_rows(t_p2 * top_k, num_experts, block_m), block_m)
    grid = (num_tokens, triton.cdiv(num_experts, NORM_ROUTE_BLOCK_E))
    _norm_route_align_kernel[grid](
        x, residual, norm_weight, gate_weight, out, res_out, logits, _launch_counter(device), weights, ids, sorted_ids,
        expert_ids, num_rows, num_tokens, x.stride(0), x.stride(1) if terms > 1 else 0, residual.stride(0),
        gate_weight.stride(0), eps, TERMS=terms, N=hidden, N_P2=triton.next_power_of_2(hidden), NUM_EXPERTS=num_experts,
        E_P2=triton.next_power_of_2(num_experts), BLOCK_E=NORM_ROUTE_BLOCK_E, TOP_K=top_k, T_P2=t_p2,
        NB_P2=triton.next_power_of_2(max_blocks), RENORM=renormalize, BLOCK_M=block_m, ROUTE=route,
        num_warps=NORM_ROUTE_NUM_WARPS if route else NORM_ONLY_NUM_WARPS, **pdl_launch(device, "norm_route"),
    )  # fmt: skip
    if not route:
        return out, res_out, logits
    return out, res_out, weights, ids, sorted_ids, expert_ids, num_rows


def max_sorted_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Worst-case rows after padding: every active expert (at most min(pairs, E)) adds < BLOCK_M."""
    return num_pairs + min(num_pairs, num_experts) * (block_m - 1)


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group token-expert pairs by expert, padded per expert to block_m rows.

    Returns (sorted_ids [R] int32, expert_ids [R // block_m] int32, num_rows [1] int32) where
    R = max_sorted_rows(...) rounded up to block_m; rows at or past num_rows are unused.
    """
    flat = topk_ids.reshape(-1)
    numel = flat.numel()
    device = flat.device
    rows = triton.cdiv(max_sorted_rows(numel, num_experts, block_m), block_m) * block_m
    sorted_ids = torch.empty(rows, dtype=torch.int32, device=device)
    expert_ids = torch.empty(rows // block_m, dtype=torch.int32, device=device)
    if numel <= ALIGN_TRITON_MAX_PAIRS:
        num_rows = torch.empty(1, dtype=torch.int32, device=device)
        _moe_align_kernel[(num_experts,)](
            flat,
            sorted_ids,
            expert_ids,
            num_rows,
            numel,
            NUM_EXPERTS=num_experts,
            E_P2=triton.next_power_of_2(num_experts),
            BLOCK_M=block_m,
            CHUNK=min(4096, max(64, triton.next_power_of_2(numel))),
            num_warps=4,
        )
        return sorted_ids, expert_ids, num_rows

    flat = flat.to(torch.int64)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would sync on its size
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(numel, device=device) - first_of_expert[sorted_experts]
    dest = starts[sorted_experts] + rank
    sorted_ids.fill_(numel)
    sorted_ids[dest] = order.to(torch.int32)
    block_first = torch.arange(0, rows, block_m, device=device)
    expert_ids.copy_(torch.searchsorted(ends, block_first, right=True).clamp_(max=num_experts - 1))
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


@triton.jit(do_not_specialize=["numel", "NUM_ROW_BLOCKS"])
def _moe_gemm1_kernel(
    a_ptr, w_ptr, act_ptr, sorted_ids_ptr, expert_ids_ptr, num_rows_ptr, numel, N, K,
    stride_am, stride_we, stride_wn, stride_actm, NUM_ROW_BLOCKS,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PDL_MODE: tl.constexpr = 0,
):  # fmt: skip
    """act[row, n] = silu(x[tok] . w13[e, n]) * (x[tok] . w13[e, N + n]) for sorted rows."""
    pdl_start(PDL_MODE)
    pdl_wait(PDL_MODE)
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(NUM_ROW_BLOCKS - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_size
    pid_n = (pid % num_in_group) // group_size

    if pid_m * BLOCK_M >= tl.load(num_rows_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    _gemm1_tile(
        a_ptr, w_ptr, act_ptr, offs_m, pair, pair < numel, expert, pid_n, N, K, stride_am, stride_we, stride_wn,
        stride_actm, TOP_K, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip


@triton.jit
def _gemm1_tile(
    a_ptr, w_ptr, act_ptr, offs_m, pair, m_mask, expert, pid_n, N, K, stride_am, stride_we, stride_wn, stride_actm,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """GEMM1 of one tile: rows offs_m of act (their pairs `pair`, real where m_mask) x columns pid_n of expert."""
    tok = (pair // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + tok[:, None] * stride_am + offs_k[None, :]
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + N * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
        w_mask = (offs_k[:, None] < k_left) & n_mask[None, :]
        g = tl.load(g_ptrs, mask=w_mask, other=0.0)
        u = tl.load(u_ptrs, mask=w_mask, other=0.0)
        acc_g = tl.dot(a, g, acc_g)
        acc_u = tl.dot(a, u, acc_u)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(
        act_ptr + offs_m[:, None].to(tl.int64) * stride_actm + offs_n[None, :],
        act.to(act_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


@triton.jit
def _pair_route(
    logits_ptr, p, NUM_EXPERTS: tl.constexpr, E_P2: tl.constexpr, TOP_K: tl.constexpr, RENORM: tl.constexpr
):  # fmt: skip
    """(expert, routing weight) of pair p = token * TOP_K + k: the token's k-th choice in the softmax
    top-k of its router logits. Each routing program recomputes it (redundant, but shorter than a
    routing launch or a round trip through memory between the two GEMMs)."""
    top_w, top_i = row_topk(logits_ptr + (p // TOP_K) * NUM_EXPERTS, NUM_EXPERTS, E_P2, TOP_K, RENORM)
    mine = tl.arange(0, TOP_K)[None, :] == p % TOP_K
    expert = tl.sum(tl.sum(tl.where(mine, top_i, 0), 1), 0).to(tl.int64)
    weight = tl.sum(tl.sum(tl.where(mine, top_w, 0.0), 1), 0)
    return expert, weight


@triton.jit(do_not_specialize=["numel"])
def _route_gemm1_kernel(
    logits_ptr, a_ptr, w_ptr, act_ptr, numel, N, K, stride_am, stride_we, stride_wn, stride_actm,
    NUM_EXPERTS: tl.constexpr, E_P2: tl.constexpr, TOP_K: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL_MODE: tl.constexpr = 0,
):  # fmt: skip
    """Decode steps of a token or two: every program routes its pair p = token * TOP_K + k itself
    and runs that pair's GEMM1 tile. Row block p of act is the pair's: its row p * BLOCK_M is real,
    the rest padding (no grouping of pairs by expert, so an expert two tokens chose is read twice)."""
    pdl_start(PDL_MODE)
    pdl_wait(PDL_MODE)
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    p = pid // tiles_n
    expert, _ = _pair_route(logits_ptr, p, NUM_EXPERTS, E_P2, TOP_K, RENORM)
    r = tl.arange(0, BLOCK_M)
    _gemm1_tile(
        a_ptr, w_ptr, act_ptr, p * BLOCK_M + r, tl.where(r == 0, p, numel), r == 0, expert, pid % tiles_n, N, K,
        stride_am, stride_we, stride_wn, stride_actm, TOP_K, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip


@triton.jit(do_not_specialize=["numel"])
def _route_gemm2_kernel(
    logits_ptr, act_ptr, w_ptr, out_ptr, numel, N, K, stride_actm, stride_we, stride_wn, stride_om,
    NUM_EXPERTS: tl.constexpr, E_P2: tl.constexpr, TOP_K: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUTE_BEFORE_WAIT: tl.constexpr,
    PDL_MODE: tl.constexpr = 0,
):  # fmt: skip
    """GEMM2 for _route_gemm1_kernel's layout: out[p, n] = weight[p] * (act[p * BLOCK_M] . w2[expert[p], n]).

    The pair's expert and weight come from its own routing. With ROUTE_BEFORE_WAIT it runs before
    the PDL wait: when GEMM1 lets these programs launch only after its own wait, the router's
    logits are complete and visible by then, so after the wait the first weight load issues at
    once instead of after reading routing outputs GEMM1 wrote (-14 to -42 us per decode step at
    batch 1-2, H200)."""
    pdl_start(PDL_MODE)
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    p = pid // tiles_n
    if ROUTE_BEFORE_WAIT:
        expert, weight = _pair_route(logits_ptr, p, NUM_EXPERTS, E_P2, TOP_K, RENORM)
        pdl_wait(PDL_MODE)
    else:
        pdl_wait(PDL_MODE)
        expert, weight = _pair_route(logits_ptr, p, NUM_EXPERTS, E_P2, TOP_K, RENORM)
    r = tl.arange(0, BLOCK_M)
    offs_n = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _gemm2_tile(
        act_ptr, w_ptr, p * BLOCK_M + r, r == 0, expert, offs_n, N, K, stride_actm, stride_we, stride_wn,
        BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    acc = acc * weight.to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded as the sorted path stores it
    tl.store(
        out_ptr + p.to(tl.int64) * stride_om + offs_n[None, :] + r[:, None] * 0,
        acc.to(out_ptr.dtype.element_ty),
        mask=(r == 0)[:, None] & (offs_n < N)[None, :],
    )


@triton.jit
def _gemm2_tile(
    act_ptr, w_ptr, offs_m, m_mask, expert, offs_n, N, K, stride_actm, stride_we, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """act[offs_m] (real where m_mask) x w2[expert, offs_n]^T, unscaled, in float32."""
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_actm + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & n_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit(do_not_specialize=["numel", "NUM_ROW_BLOCKS"])
def _moe_gemm2_kernel(
    act_ptr,
    w_ptr,
    out_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_rows_ptr,
    topk_weights_ptr,
    numel,
    N,
    K,
    stride_actm,
    stride_we,
    stride_wn,
    stride_om,
    NUM_ROW_BLOCKS,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PDL_MODE: tl.constexpr = 0,
):
    """out[pair, n] = weight[pair] * (act[row] . w2[e, n]) for sorted rows."""
    pdl_start(PDL_MODE)
    pdl_wait(PDL_MODE)
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(NUM_ROW_BLOCKS - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_size
    pid_n = (pid % num_in_group) // group_size

    if pid_m * BLOCK_M >= tl.load(num_rows_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    m_mask = pair < numel
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = _gemm2_tile(
        act_ptr, w_ptr, offs_m, m_mask, expert, offs_n, N, K, stride_actm, stride_we, stride_wn,
        BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    weight = tl.load(topk_weights_ptr + pair, mask=m_mask, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    tl.store(
        out_ptr + pair[:, None].to(tl.int64) * stride_om + offs_n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


def _launch_gemm1(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    act: torch.Tensor,
    sorted_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_rows: torch.Tensor,
    top_k: int,
    cfg: MoEConfig,
) -> None:
    inter = w13.shape[1] // 2
    num_row_blocks = expert_ids.shape[0]
    grid = (num_row_blocks * triton.cdiv(inter, cfg.n1),)
    _moe_gemm1_kernel[grid](
        hidden,
        w13,
        act,
        sorted_ids,
        expert_ids,
        num_rows,
        hidden.shape[0] * top_k,
        inter,
        hidden.shape[1],
        hidden.stride(0),
        w13.stride(0),
        w13.stride(1),
        act.stride(0),
        num_row_blocks,
        TOP_K=top_k,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.n1,
        BLOCK_K=cfg.k1,
        GROUP_M=cfg.group_m,
        num_warps=cfg.warps1,
        num_stages=cfg.stages1,
        **pdl_launch(hidden.device, "gemm1"),
    )


def _launch_gemm2(
    act: torch.Tensor,
    w2: torch.Tensor,
    out: torch.Tensor,
    sorted_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_rows: torch.Tensor,
    topk_weights: torch.Tensor,
    cfg: MoEConfig,
) -> None:
    hidden_size, inter = w2.shape[1], w2.shape[2]
    num_row_blocks = expert_ids.shape[0]
    grid = (num_row_blocks * triton.cdiv(hidden_size, cfg.n2),)
    _moe_gemm2_kernel[grid](
        act,
        w2,
        out,
        sorted_ids,
        expert_ids,
        num_rows,
        topk_weights,
        out.shape[0],
        hidden_size,
        inter,
        act.stride(0),
        w2.stride(0),
        w2.stride(1),
        out.stride(0),
        num_row_blocks,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.n2,
        BLOCK_K=cfg.k2,
        GROUP_M=cfg.group_m,
        num_warps=cfg.warps2,
        num_stages=cfg.stages2,
        **pdl_launch(act.device, "gemm2"),
    )


def fused_moe_triton(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    cfg: MoEConfig | None = None,
    reduce: bool = True,
) -> torch.Tensor:
    """The Triton path of fused_moe (align + GEMM1 with SiLU-mul + GEMM2 with routing weight)."""
    num_tokens, hidden_size = hidden.shape
    top_k = topk_ids.shape[1]
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    assert hidden.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1
    if num_tokens == 0:
        return torch.zeros_like(hidden) if reduce else hidden.new_zeros(0, top_k, hidden_size)
    if cfg is None:
        cfg = get_moe_config(num_tokens, num_experts, inter, hidden_size, top_k)
    sorted_ids, expert_ids, num_rows = moe_align(topk_ids, num_experts, cfg.block_m)
    pair_out = _expert_gemms(hidden, w13, w2, topk_weights, sorted_ids, expert_ids, num_rows, cfg)
    if not reduce:
        return pair_out.view(num_tokens, top_k, hidden_size)
    if top_k == 1:
        return pair_out
    return moe_sum(pair_out.view(num_tokens, top_k, hidden_size))


def _expert_gemms(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    sorted_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_rows: torch.Tensor,
    cfg: MoEConfig,
) -> torch.Tensor:
    """GEMM1 (+SiLU-mul) and GEMM2 (+routing weight) over aligned pairs: the weighted terms [T*k, H]."""
    num_tokens, top_k = topk_weights.shape
    act = torch.empty(sorted_ids.shape[0], w2.shape[2], dtype=hidden.dtype, device=hidden.device)
    _launch_gemm1(hidden, w13, act, sorted_ids, expert_ids, num_rows, top_k, cfg)
    pair_out = torch.empty(num_tokens * top_k, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    weights = topk_weights.reshape(-1)  # fp32 or the activation dtype; the kernel upcasts
    _launch_gemm2(act, w2, pair_out, sorted_ids, expert_ids, num_rows, weights, cfg)
    return pair_out


def routed_moe(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    renormalize: bool,
) -> torch.Tensor:
    """Same contract as ops.routed_moe: router, top-k routing and the experts; returns [T, k, H].

    Decode-sized steps (<= ROUTE_ALIGN_MAX_TOKENS) route and align in one launch; larger ones
    take the routing kernel and then fused_moe.
    """
    num_tokens, hidden_size = hidden.shape
    if not 0 < num_tokens <= ROUTE_ALIGN_MAX_TOKENS or top_k & (top_k - 1):
        weights, ids = route(hidden, gate_weight, top_k, renormalize)
        return fused_moe(hidden, w13, w2, weights, ids, reduce=False)
    cfg = _decode_moe_config(num_tokens, w13, top_k)
    logits = F.linear(hidden, gate_weight)
    weights, _, sorted_ids, expert_ids, num_rows = route_align(logits, top_k, renormalize, cfg.block_m, hidden.dtype)
    pair_out = _expert_gemms(hidden, w13, w2, weights, sorted_ids, expert_ids, num_rows, cfg)
    return pair_out.view(num_tokens, top_k, hidden_size)


def _decode_moe_config(num_tokens: int, w13: torch.Tensor, top_k: int) -> MoEConfig:
    num_experts, two_inter, hidden_size = w13.shape
    return get_moe_config(num_tokens, num_experts, two_inter // 2, hidden_size, top_k)


def norm_routed_moe(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    gate_weight: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ops.norm_routed_moe: the post-attention add + RMSNorm, then routed_moe.

    Decode-sized steps do the norm, the router GEMV, the routing and the align in one launch
    (norm_route_align) before the two expert GEMMs: 3 launches where there were 5. x may be
    o_proj's split-K terms [T, S, H] (linear_unreduced): the norm sums them.
    """
    num_tokens, hidden_size = residual.shape
    if not NORM_ROUTE_FUSED or not 0 < num_tokens <= ROUTE_ALIGN_MAX_TOKENS or top_k & (top_k - 1):
        h, residual = add_rms_norm(x, residual, norm_weight, eps)
        return routed_moe(h, gate_weight, w13, w2, top_k, renormalize), residual
    cfg = _decode_moe_config(num_tokens, w13, top_k)
    if num_tokens <= ROUTE_IN_GEMM1_MAX_TOKENS:
        h, residual, logits = norm_route_align(
            x, residual, norm_weight, eps, gate_weight, top_k, renormalize, cfg.block_m, route=False
        )
        return _route_in_gemm1(h, logits, w13, w2, top_k, renormalize, cfg), residual
    h, residual, weights, _, sorted_ids, expert_ids, num_rows = norm_route_align(
        x, residual, norm_weight, eps, gate_weight, top_k, renormalize, cfg.block_m
    )
    pair_out = _expert_gemms(h, w13, w2, weights, sorted_ids, expert_ids, num_rows, cfg)
    return pair_out.view(num_tokens, top_k, hidden_size), residual


# Decode steps of up to this many tokens route inside GEMM1 (_route_gemm1_kernel) instead of in the
# router's last program (0: never; A/B switch).
ROUTE_IN_GEMM1_MAX_TOKENS = 2  # batch 1: -90 us per step, batch 2: -114 us; batch 4: +280 us (H200)


def _route_in_gemm1(
    h: torch.Tensor,
    logits: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    renormalize: bool,
    cfg: MoEConfig,
) -> torch.Tensor:
    """Routing + GEMM1 in one launch, routing + GEMM2 in the next: the tokens' unreduced terms [T, k, H]."""
    assert h.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1 and logits.is_contiguous()
    num_experts, two_inter, hidden_size = w13.shape
    inter, num_pairs = two_inter // 2, h.shape[0] * top_k
    routing = dict(NUM_EXPERTS=num_experts, E_P2=triton.next_power_of_2(num_experts), TOP_K=top_k, RENORM=renormalize)
    act = torch.empty(num_pairs * cfg.block_m, inter, dtype=h.dtype, device=h.device)
    gemm1_pdl = pdl_launch(h.device, "route_gemm1")
    _route_gemm1_kernel[(num_pairs * triton.cdiv(inter, cfg.n1),)](
        logits, h, w13, act, num_pairs, inter, hidden_size, h.stride(0), w13.stride(0), w13.stride(1),
        act.stride(0), **routing, BLOCK_M=cfg.block_m, BLOCK_N=cfg.n1, BLOCK_K=cfg.k1, num_warps=cfg.warps1,
        num_stages=cfg.stages1, **gemm1_pdl,
    )  # fmt: skip
    pair_out = torch.empty(num_pairs, hidden_size, dtype=h.dtype, device=h.device)
    _route_gemm2_kernel[(num_pairs * triton.cdiv(hidden_size, cfg.n2),)](
        logits, act, w2, pair_out, num_pairs, hidden_size, inter, act.stride(0), w2.stride(0), w2.stride(1),
        pair_out.stride(0), **routing, BLOCK_M=cfg.block_m, BLOCK_N=cfg.n2, BLOCK_K=cfg.k2,
        ROUTE_BEFORE_WAIT=gemm1_pdl["PDL_MODE"] != 2,  # mode 2 would let GEMM2 start before the logits exist
        num_warps=cfg.warps2, num_stages=cfg.stages2, **pdl_launch(h.device, "gemm2"),
    )  # fmt: skip
    return pair_out.view(h.shape[0], top_k, hidden_size)


@triton.jit
def _moe_sum_kernel(x_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        acc += tl.load(x_ptr + (token * TOP_K + k) * H + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * H + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def moe_sum(pair_out: torch.Tensor) -> torch.Tensor:
    """Sum [T, k, H] over k in one light launch (torch's generic reduction costs ~5 us at decode)."""
    num_tokens, top_k, hidden = pair_out.shape
    out = torch.empty(num_tokens, hidden, dtype=pair_out.dtype, device=pair_out.device)
    block = 1024
    _moe_sum_kernel[(num_tokens, triton.cdiv(hidden, block))](
        pair_out, out, hidden, TOP_K=top_k, BLOCK=block, num_warps=4
    )
    return out


def fused_moe_grouped_mm(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    reduce: bool = True,
) -> torch.Tensor:
    """MoE through torch._grouped_mm (CUTLASS grouped GEMM on SM90): for large prefill chunks.

    Pairs are sorted by expert with torch ops (no host sync), the two grouped GEMMs run on
    the sorted rows, and the weighted rows are summed back per token.
    """
    num_tokens, hidden_size = hidden.shape
    top_k = topk_ids.shape[1]
    num_experts = w13.shape[0]
    inter = w2.shape[2]
    flat = topk_ids.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=hidden.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    x_sorted = hidden[order // top_k]
    gate_up = torch._grouped_mm(x_sorted, w13.transpose(1, 2), offs=offs)
    act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    down = torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)
    down = down * topk_weights.reshape(-1)[order].to(down.dtype)[:, None]
    pair_out = torch.empty_like(down)
    pair_out[order] = down  # back to (token, k) order, then reduce over k
    pair_out = pair_out.view(num_tokens, top_k, hidden_size)
    return pair_out.sum(dim=1) if reduce else pair_out


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    reduce: bool = True,
) -> torch.Tensor:
    """Same contract as ops.fused_moe: returns sum_k w[t, k] * expert_{ids[t, k]}(hidden[t]) as [T, H]
    (reduce=False: the weighted terms as [T, k, H], for add_rms_norm to sum in its own pass).

    Picks torch._grouped_mm for chunks of at least GROUPED_MM_MIN_TOKENS tokens (where it
    measured faster), the Triton kernels otherwise. Both paths are free of host syncs.
    """
    num_tokens = hidden.shape[0]
    if (
        moe_configs.GROUPED_MM_MIN_TOKENS is not None
        and num_tokens >= moe_configs.GROUPED_MM_MIN_TOKENS
        and hasattr(torch, "_grouped_mm")
        and hidden.is_cuda
        and torch.cuda.get_device_capability(hidden.device)[0] >= 9
    ):
        return fused_moe_grouped_mm(hidden, w13, w2, topk_weights, topk_ids, reduce=reduce)
    return fused_moe_triton(hidden, w13, w2, topk_weights, topk_ids, reduce=reduce)
