"""Fusions that cut the decode step's kernel count: at batch 1 a step is ~1,200 tiny launches,
and each costs a few microseconds of GPU time even inside a CUDA graph.

- `qk_norm_rope_cache`: per-head RMSNorm of q and k, rotary embedding and the KV-cache write,
  one launch (was ~19).
- `add_rms_norm`: residual add + RMSNorm, one launch (was 2+); it also sums the MoE's k
  weighted expert outputs, so the MoE needs no reduction launch of its own.
- `route`: softmax, top-k and renormalisation after the router GEMV, one launch (was ~6).
Same contracts as the torch references in qwenserve.model.ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwenserve.kernels.pdl import pdl_launch, pdl_start, pdl_wait


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr,
    q_out_ptr,
    qw_ptr,
    kw_ptr,
    cos_sin_ptr,
    pos_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_qkv,
    stride_term,
    stride_slot,
    stride_ch,
    eps,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    TERMS: tl.constexpr,
    PDL_MODE: tl.constexpr = 0,
):
    pdl_start(PDL_MODE)
    token = tl.program_id(0)
    head = tl.program_id(1)  # 0..NUM_HEADS-1 are q heads, then the kv heads
    is_q = head < NUM_HEADS
    offs = tl.arange(0, HALF)
    dt = q_out_ptr.dtype.element_ty
    w_ptr = tl.where(is_q, qw_ptr, kw_ptr)
    w1 = tl.load(w_ptr + offs).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + offs).to(tl.float32)
    pdl_wait(PDL_MODE)
    base = qkv_ptr + token.to(tl.int64) * stride_qkv + head * HEAD_DIM
    x1 = _sum_terms(base + offs, stride_term, TERMS, dt)
    x2 = _sum_terms(base + HALF + offs, stride_term, TERMS, dt)
    rstd = tl.rsqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / HEAD_DIM + eps)
    # Round to the activation dtype before and after the weight, as the Hugging Face norm does.
    n1 = ((x1 * rstd).to(dt).to(tl.float32) * w1).to(dt).to(tl.float32)
    n2 = ((x2 * rstd).to(dt).to(tl.float32) * w2).to(dt).to(tl.float32)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * (2 * HALF) + offs)
    sin = tl.load(cos_sin_ptr + pos * (2 * HALF) + HALF + offs)
    o1 = (n1 * cos - n2 * sin).to(dt)
    o2 = (n2 * cos + n1 * sin).to(dt)
    if is_q:
        out = q_out_ptr + (token.to(tl.int64) * NUM_HEADS + head) * HEAD_DIM
        tl.store(out + offs, o1)
        tl.store(out + HALF + offs, o2)
    else:
        # Keys and values go straight into their cache slot: no separate KV-write launch.
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:
            kv_head = head - NUM_HEADS
            dst = slot * stride_slot + kv_head * stride_ch
            tl.store(k_cache_ptr + dst + offs, o1.to(k_cache_ptr.dtype.element_ty))
            tl.store(k_cache_ptr + dst + HALF + offs, o2.to(k_cache_ptr.dtype.element_ty))
            v_src = base + (NUM_KV_HEADS * HEAD_DIM)
            v1 = _sum_terms(v_src + offs, stride_term, TERMS, dt)
            v2 = _sum_terms(v_src + HALF + offs, stride_term, TERMS, dt)
            tl.store(v_cache_ptr + dst + offs, v1.to(v_cache_ptr.dtype.element_ty))
            tl.store(v_cache_ptr + dst + HALF + offs, v2.to(v_cache_ptr.dtype.element_ty))


@triton.jit
def _sum_terms(ptr, stride_term, TERMS: tl.constexpr, dt: tl.constexpr):
    """The projection's value at ptr as float32, rounded to dt: the sum of its TERMS unreduced
    split-K terms (linear_unreduced), or the value itself (TERMS == 1)."""
    x = tl.load(ptr).to(tl.float32)
    for t in tl.static_range(1, TERMS):
        x += tl.load(ptr + t * stride_term).to(tl.float32)
    return x.to(dt).to(tl.float32)


def qk_norm_rope_cache(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Normed, rotated q [T, H, D]; the normed, rotated k and the v of every token go straight
    into their cache slots (see ops.qk_norm_rope_cache). qkv may be split-K terms [T, S, N]."""
    num_tokens = qkv.shape[0]
    terms = qkv.shape[1] if qkv.dim() == 3 else 1
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=q_weight.dtype, device=qkv.device)
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and qkv.stride(-1) == 1
    if num_tokens:
        _qk_norm_rope_kernel[(num_tokens, num_heads + num_kv_heads)](
            qkv, q, q_weight, k_weight, cos_sin_cache, positions, k_cache, v_cache, slot_mapping,
            qkv.stride(0), qkv.stride(1) if terms > 1 else 0, k_cache.stride(1), k_cache.stride(2), eps,
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=head_dim // 2, TERMS=terms,
            num_warps=1, **pdl_launch(qkv.device, "qk_norm"),
        )  # fmt: skip
    return q


ADD_RMS_NORM_WARPS: int | None = None  # None: 4 up to 2048 columns, else 8


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_xk, stride_r, eps, N: tl.constexpr,
    N_P2: tl.constexpr, TERMS: tl.constexpr, PDL_MODE: tl.constexpr = 0,
):
    pdl_start(PDL_MODE)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, N_P2)
    mask = c < N
    dt = res_ptr.dtype.element_ty
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    pdl_wait(PDL_MODE)
    x = tl.zeros([N_P2], dtype=tl.float32)
    for k in tl.static_range(TERMS):
        x += tl.load(x_ptr + row * stride_x + k * stride_xk + c, mask=mask, other=0.0).to(tl.float32)
    x = x.to(dt).to(tl.float32)  # summed terms (MoE or split-K) are an activation, as in the reference
    r = tl.load(res_ptr + row * stride_r + c, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(dt)  # the residual stream lives in the activation dtype, as in the reference
    tl.store(res_out_ptr + row * N + c, s, mask=mask)
    sf = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(sf * sf, 0) / N + eps)
    y = ((sf * rstd).to(dt).to(tl.float32) * w).to(dt)
    tl.store(out_ptr + row * N + c, y, mask=mask)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass over [T, N] rows; x may be [T, k, N]
    (fused_moe's or linear_unreduced's unreduced terms), summed in the same pass."""
    terms = x.shape[1] if x.dim() == 3 else 1
    num_rows, n = residual.shape
    assert x.stride(-1) == 1
    out = torch.empty_like(residual)
    res_out = torch.empty_like(residual)
    if num_rows:
        n_p2 = triton.next_power_of_2(n)
        _add_rms_norm_kernel[(num_rows,)](
            x, residual, weight, out, res_out, x.stride(0), x.stride(1) if terms > 1 else 0, residual.stride(0),
            eps, N=n, N_P2=n_p2, TERMS=terms, num_warps=ADD_RMS_NORM_WARPS or (4 if n_p2 <= 2048 else 8),
            **pdl_launch(residual.device, "add_rms_norm"),
        )  # fmt: skip
    return out, res_out


@triton.jit
def softmax_topk(logit, t_ok, e, e_ok, T_P2: tl.constexpr, E_P2: tl.constexpr, TOP_K: tl.constexpr, RENORM: tl.constexpr):
    """Softmax over experts and top-k of each token's router logits [T_P2, E_P2] (float32, -inf
    past E): (weights, expert ids) [T_P2, TOP_K], as every routing kernel computes them.

    The experts are picked on exp(logit - max), before the division by the sum: max and exp give
    the same bits in every kernel, while the sum's order depends on the kernel's warps, and a
    rounding tie it made in one kernel but not another would let the two routing GEMMs, which
    route the same token separately, pick different experts."""
    k_idx = tl.arange(0, TOP_K)
    logit = tl.where(t_ok[:, None], logit, 0.0)  # padding rows stay finite; callers mask them
    u = tl.exp(logit - tl.max(logit, 1)[:, None])
    total = tl.sum(u, 1)
    u = tl.where(e_ok[None, :], u, -1.0)
    top_w = tl.zeros([T_P2, TOP_K], dtype=tl.float32)
    top_i = tl.zeros([T_P2, TOP_K], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(u, 1)
        idx = tl.min(tl.where(u == best[:, None], e[None, :], E_P2), 1)  # lowest index among ties
        top_w = tl.where(k_idx[None, :] == k, (best / total)[:, None], top_w)
        top_i = tl.where(k_idx[None, :] == k, idx[:, None], top_i)
        u = tl.where(e[None, :] == idx[:, None], -1.0, u)
    if RENORM:
        top_w = top_w / tl.sum(top_w, 1)[:, None]
    return top_w, top_i


@triton.jit
def row_topk(row_ptr, E: tl.constexpr, E_P2: tl.constexpr, TOP_K: tl.constexpr, RENORM: tl.constexpr):
    """softmax_topk of one token's router logits at row_ptr: (weights, expert ids) [1, TOP_K]."""
    e = tl.arange(0, E_P2)
    e_ok = e < E
    logit = tl.load(row_ptr + e[None, :], mask=e_ok[None, :], other=float("-inf")).to(tl.float32)
    return softmax_topk(logit, tl.arange(0, 1) < 1, e, e_ok, 1, E_P2, TOP_K, RENORM)


@triton.jit
def _router_topk_kernel(
    logits_ptr, w_out_ptr, id_out_ptr, stride_l, E: tl.constexpr, E_P2: tl.constexpr, TOP_K: tl.constexpr,
    RENORM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    top_w, top_i = row_topk(logits_ptr + row * stride_l, E, E_P2, TOP_K, RENORM)
    k_idx = tl.arange(0, TOP_K)[None, :]
    tl.store(w_out_ptr + row * TOP_K + k_idx, top_w.to(w_out_ptr.dtype.element_ty))
    tl.store(id_out_ptr + row * TOP_K + k_idx, top_i)


def route(
    x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits on cuBLAS, then softmax + top-k + renormalisation in one launch (see ops.route).

    A fused GEMV + top-k in one program per token measured far slower at decode (one SM
    streaming the 512 KiB gate: 138 vs 225 tok/s at batch 1), so the GEMV stays on cuBLAS.
    """
    return router_topk(torch.nn.functional.linear(x, gate_weight), top_k, renormalize, x.dtype)


def router_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, top-k, optional renormalisation: (weights [T, k] out_dtype, ids [T, k] int32)."""
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=out_dtype, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if num_tokens:
        _router_topk_kernel[(num_tokens,)](
            router_logits, weights, ids, router_logits.stride(0), E=num_experts,
            E_P2=triton.next_power_of_2(num_experts), TOP_K=top_k, RENORM=renormalize, num_warps=1,
        )  # fmt: skip
    return weights, ids
