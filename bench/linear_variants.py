"""Which cuBLAS call is fastest for the decode projections (batch 1..8), cold L2, in CUDA graphs.

Usage on a GPU machine: python3 bench/linear_variants.py
Times F.linear (what the model calls), torch.mv at one row, and x @ W^T with W stored
transposed, for the Qwen3-Coder-30B-A3B projection shapes; prints microseconds and TB/s.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from kernels import bench  # noqa: E402

SHAPES = {"qkv": (5120, 2048), "o_proj": (2048, 4096), "router": (128, 2048), "lm_head": (151936, 2048)}


def main() -> None:
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        wt = w.t().contiguous()
        for rows in (1, 2, 8):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
            variants = {
                "F.linear": partial(F.linear, x, w),
                "mm(x, Wt)": partial(torch.mm, x, wt),
                "mm(x, W.t()) out=": partial(torch.mm, x, w.t(), out=out),
            }
            if rows == 1:
                variants["mv(W, x)"] = partial(torch.mv, w, x[0])
                variants["mv(Wt.t(), x)"] = partial(torch.mv, wt.t(), x[0])
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                for label, fn in variants.items():
                    us = bench(fn, graph=True) * 1e3
                    print(f"{name:8s} rows={rows} {lib:8s} {label:18s} {us:7.2f} us  {n * k * 2 / us / 1e6:5.2f} TB/s", flush=True)
            torch.backends.cuda.preferred_blas_library("cublas")


if __name__ == "__main__":
    main()
