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

from qwenserve.kernels.pdl import pdl_launch, pdl_start, pdl_wait

# Steps of at most this many tokens take the GEMV (0: every projection on cuBLAS; A/B switch).
GEMV_MAX_ROWS = 1
# (N, K) -> (BLOCK_N, BLOCK_K, SPLITS, num_warps), from bench/read_ceiling.py's sweep (H200).
GEMV_TILES: dict[tuple[int, int], tuple[int, int, int, int]] = {
    (2048, 4096): (16, 256, 4, 4),  # Qwen3-30B-A3B o_proj
    (5120, 2048): (16, 256, 2, 4),  # Qwen3-30B-A3B qkv_proj (32 q + 2 x 4 kv heads of 128)
}


@triton.jit
def _gemv_split_k_kernel(
    x_ptr, w_ptr, out_ptr, N, stride_wn, K_PER_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL_MODE: tl.constexpr = 0,
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
