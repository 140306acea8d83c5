"""Skinny matmul for decode: y = x @ W^T with only a few rows in x.

At batch 1 the attention projections are pure weight streaming, and cuBLAS's small-M
kernels reach ~2 TB/s on them (plus a split-K reduce launch for o_proj); the router's
128x2048 GEMV is launch-bound. This kernel splits W's output rows over many programs,
each streaming its [BLOCK_N, K] slab once for all the (<= MAX_ROWS) input rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_ROWS = 4  # above this cuBLAS's tensor-core kernels win


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    k_offs = tl.arange(0, BLOCK_K)
    for m in tl.static_range(ROWS):
        row_ok = m < M
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + k_offs
            k_mask = (k < K) & row_ok
            x = tl.load(x_ptr + m * stride_x + k, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(
                w_ptr + n[:, None].to(tl.int64) * stride_w + k[None, :],
                mask=n_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            acc += w.to(tl.float32) * x[None, :]
        tl.store(y_ptr + m * stride_y + n, tl.sum(acc, 1).to(y_ptr.dtype.element_ty), mask=n_mask & row_ok)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias; the Triton GEMV for up to MAX_ROWS rows on CUDA."""
    rows, k = x.shape
    n = weight.shape[0]
    if rows > MAX_ROWS or rows == 0 or not x.is_cuda or x.stride(1) != 1 or weight.stride(1) != 1:
        return F.linear(x, weight)
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    block_n = 16 if n >= 4096 else 8
    # One pass over W per row: W is read ROWS times, but for ROWS <= 4 it stays in L2 between passes.
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, y, rows, n, k, x.stride(0), weight.stride(0), y.stride(0),
        ROWS=rows, BLOCK_N=block_n, BLOCK_K=256, num_warps=4,
    )  # fmt: skip
    return y
