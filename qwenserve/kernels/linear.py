"""One-token projections as split-K GEMVs whose partial sums the next kernel adds.

At one token a projection is a pure weight stream. cuBLAS runs the batch-1 o_proj as a split-K
GEMM plus a reduction launch (7.3 + 1.8 us on an H200: 1.9 TB/s) and qkv in 7.9 us. This GEMV
splits K too but leaves the S fp32 partial sums unreduced, [T, S, N], for the kernel that reads
the projection anyway to add: qk_norm_rope_cache for qkv, the post-attention add + RMSNorm (+
router) for o_proj. Measured alone with a cold L2 (bench/read_ceiling.py, H200): o_proj 6.2 us,
qkv 7.0-7.1 us; in the batch-1 decode graph (bench/ab_decode.py, H200) the step takes 219 us less
at 512 context (3,020 -> 2,801 us) and 221 us less at 32k (o_proj alone: -163 us). The consumers sum the terms in fp32 and round once to the activation dtype, as
cuBLAS rounds its fp32 accumulator: the same contract as the MoE's unreduced expert terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qwenserve.kernels.fused import (
    head_norm_weights,
    launch_counter,
    norm_rope_store_head,
    qk_norm_rope_cache,
)
from qwenserve.kernels.pdl import pdl_launch, pdl_start, pdl_wait

# Steps of at most this many tokens take the GEMV (0: every projection on cuBLAS; A/B switch).
GEMV_MAX_ROWS = 1
# False: the one-token qkv GEMV and q/k-norm + RoPE + KV write run as two launches (A/B switch).
QKV_NORM_FUSED = True
# (N, K) -> (BLOCK_N, BLOCK_K, SPLITS, num_warps), from bench/read_ceiling.py's sweep (H200).
GEMV_TILES: dict[tuple[int, int], tuple[int, int, int, int]] = {
    (2048, 4096): (16, 256, 4, 4),  # Qwen3-30B-A3B o_proj
    (5120, 2048): (16, 256, 2, 4),  # Qwen3-30B-A3B qkv_proj (32 q + 2 x 4 kv heads of 128)
}


@triton.jit
def _gemv_split_k_program(
    x_ptr, w_ptr, out_ptr, N, stride_wn, K_PER_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL_MODE: tl.constexpr,
):  # fmt: skip
    """out[split, n] = sum over the split's K slice of w[n, k] * x[k] (fp32), for one token."""
    pdl_start(PDL_MODE)
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # The split's K slice as [K_PER_SPLIT // BLOCK_K, BLOCK_K] tiles, all loaded before x exists:
    # under PDL the weights stream while the kernel computing x still runs.
    tiles = tl.arange(0, K_PER_SPLIT // BLOCK_K)
    offs_k = split * K_PER_SPLIT + tiles[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    w = tl.load(w_ptr + offs_n[:, None, None].to(tl.int64) * stride_wn + offs_k[None, :, :])
    pdl_wait(PDL_MODE)
    x = tl.load(x_ptr + offs_k)
    acc = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :, :], 1)  # over the tiles, then within one
    tl.store(out_ptr + split * N + offs_n, tl.sum(acc, 1))


@triton.jit
def _gemv_split_k_kernel(
    x_ptr, w_ptr, out_ptr, N, stride_wn, K_PER_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL_MODE: tl.constexpr = 0,
):  # fmt: skip
    _gemv_split_k_program(x_ptr, w_ptr, out_ptr, N, stride_wn, K_PER_SPLIT, BLOCK_N, BLOCK_K, PDL_MODE)


@triton.jit
def _qkv_norm_rope_kernel(
    x_ptr, w_ptr, terms_ptr, counter_ptr, q_out_ptr, qw_ptr, kw_ptr, cos_sin_ptr, pos_ptr, k_cache_ptr, v_cache_ptr,
    slot_ptr, N, stride_wn, stride_slot, stride_ch, eps, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, K_PER_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLITS: tl.constexpr, PDL_MODE: tl.constexpr = 0,
):  # fmt: skip
    """The one-token qkv GEMV whose last program per head (of the HEAD_DIM // BLOCK_N x SPLITS that
    write its columns) sums the head's split-K terms, norms, rotates and stores it as
    qk_norm_rope_cache does: one launch fewer per layer."""
    head = tl.program_id(0) * BLOCK_N // HEAD_DIM
    w1, w2 = head_norm_weights(qw_ptr, kw_ptr, head, NUM_HEADS, HALF)
    _gemv_split_k_program(x_ptr, w_ptr, terms_ptr, N, stride_wn, K_PER_SPLIT, BLOCK_N, BLOCK_K, PDL_MODE)
    # Every thread's term stores come before the (release) increment; the last program's (acquire)
    # increment then sees all the head's terms.
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr + head, 1, sem="acq_rel")
    if done == (HEAD_DIM // BLOCK_N) * SPLITS - 1:
        tl.store(counter_ptr + head, 0)  # every program of the head has counted: reset for the next launch
        norm_rope_store_head(
            terms_ptr, N, head, w1, w2, q_out_ptr, cos_sin_ptr, pos_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
            stride_slot, stride_ch, eps, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, HALF, SPLITS,
        )  # fmt: skip


def gemv_tile(n: int, k: int) -> tuple[int, int, int, int] | None:
    """The GEMV tile for a weight [n, k], or None where the shape has none (cuBLAS then)."""
    tile = GEMV_TILES.get((n, k))
    if tile is None:
        return None
    block_n, block_k, splits, _ = tile
    k_per_split = k // splits
    powers_of_two = k_per_split & (k_per_split - 1) == 0 and block_n & (block_n - 1) == 0
    return tile if powers_of_two and n % block_n == 0 and k % (block_k * splits) == 0 else None


def linear_unreduced(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T: for a step of GEMV_MAX_ROWS tokens or fewer, as fp32 split-K terms [T, S, N]
    whose sum over dim 1 is the product; otherwise F.linear's [T, N]. Consumers take both."""
    num_tokens, k = x.shape
    n = weight.shape[0]
    tile = gemv_tile(n, k) if 0 < num_tokens <= GEMV_MAX_ROWS else None
    if tile is None or x.stride(1) != 1 or weight.stride(1) != 1:
        return F.linear(x, weight)
    block_n, block_k, splits, warps = tile
    out = torch.empty(num_tokens, splits, n, dtype=torch.float32, device=x.device)
    for t in range(num_tokens):  # GEMV_MAX_ROWS is small: one launch per token
        _gemv_split_k_kernel[(n // block_n, splits)](
            x[t], weight, out[t], n, weight.stride(0), K_PER_SPLIT=k // splits, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=warps, **pdl_launch(x.device, "gemv"),
        )  # fmt: skip
    return out


def qkv_norm_rope_cache(
    x: torch.Tensor,
    weight: torch.Tensor,
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
    """qk_norm_rope_cache(linear_unreduced(x, weight), ...) (ops.qkv_norm_rope_cache); for one token
    in one launch, the GEMV's last program per head doing the norm, RoPE and cache write."""
    num_tokens, k = x.shape
    n = weight.shape[0]
    tile = gemv_tile(n, k) if QKV_NORM_FUSED and num_tokens == 1 <= GEMV_MAX_ROWS else None
    fusable = (
        tile is not None
        and head_dim % tile[0] == 0
        and n == (num_heads + 2 * num_kv_heads) * head_dim
        and x.stride(1) == 1
        and weight.stride(1) == 1
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
    )
    if not fusable:
        qkv = linear_unreduced(x, weight)
        return qk_norm_rope_cache(qkv, q_weight, k_weight, cos_sin_cache, positions, num_heads, num_kv_heads,
                                  head_dim, eps, k_cache, v_cache, slot_mapping)  # fmt: skip
    block_n, block_k, splits, warps = tile
    terms = torch.empty(splits, n, dtype=torch.float32, device=x.device)
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=q_weight.dtype, device=x.device)
    _qkv_norm_rope_kernel[(n // block_n, splits)](
        x, weight, terms, launch_counter(x.device, num_heads + 2 * num_kv_heads), q, q_weight, k_weight,
        cos_sin_cache, positions, k_cache, v_cache, slot_mapping, n, weight.stride(0), k_cache.stride(1),
        k_cache.stride(2), eps, NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HALF=head_dim // 2, K_PER_SPLIT=k // splits, BLOCK_N=block_n, BLOCK_K=block_k, SPLITS=splits,
        num_warps=warps, **pdl_launch(x.device, "qkv_norm"),
    )  # fmt: skip
    return q
