"""Skinny GEMM for decode-sized steps: out [M, N] = x [M, K] @ w[N, K]^T with M <= 16.

At one to sixteen rows a projection is a pure weight stream. cuBLAS picks a split-K kernel plus
a reduction launch for o_proj (K = 4096) and reaches ~1.5-2 TB/s in the decode graph; this kernel
streams each weight tile once into a 16-row tensor-core dot (the MoE GEMMs' recipe) with one
program per BLOCK_N output columns and no second launch. Tiles per weight shape come from
`LINEAR_CONFIGS`, measured inside the decode graph (bench/tune_decode_linear.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

SKINNY_MAX_ROWS = 16

# (N, K) -> (BLOCK_N, BLOCK_K, num_warps, num_stages); other shapes use DEFAULT_CONFIG.
LINEAR_CONFIGS: dict[tuple[int, int], tuple[int, int, int, int]] = {}
DEFAULT_CONFIG = (16, 256, 2, 4)


@triton.jit(do_not_specialize=["M"])
def _skinny_linear_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & n_mask[None, :], other=0.0)
        acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


def skinny_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for at most SKINNY_MAX_ROWS rows (weight [N, K], both with contiguous K)."""
    num_rows, k = x.shape
    n = weight.shape[0]
    assert num_rows <= SKINNY_MAX_ROWS and x.stride(1) == 1 and weight.stride(1) == 1
    out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = LINEAR_CONFIGS.get((n, k), DEFAULT_CONFIG)
    _skinny_linear_kernel[(triton.cdiv(n, block_n),)](
        x, weight, out, num_rows, n, k, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=SKINNY_MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Same contract as F.linear without bias: the skinny kernel for decode-sized steps, cuBLAS otherwise."""
    if 0 < x.shape[0] <= SKINNY_MAX_ROWS and x.dim() == 2 and x.stride(1) == 1 and weight.stride(1) == 1:
        return skinny_linear(x, weight)
    return F.linear(x, weight)
