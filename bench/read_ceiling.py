"""How fast one kernel can stream a decode step's weight sizes, against what the step's kernels reach.

Usage on a GPU machine: PYTHONPATH=. python3 bench/read_ceiling.py [--layers 8] [--reps 20]

For each size a batch-1 decode layer reads in one launch (o_proj 16.8 MB, qkv 21 MB, the 8 chosen
experts' w2 25 MB and w13 50 MB), a CUDA graph runs the kernel on `--layers` different buffers in a
row (more bytes than L2 holds, so every read comes from HBM) and the time per launch is printed
with its effective bandwidth. Kernels: a plain Triton streaming read (the ceiling for one launch of
that size, from launch to last byte), cuBLAS F.linear at one row for the projections, and the
engine's own batch-1 MoE (routing inside GEMM1, then GEMM2).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qwenserve.kernels import moe
from qwenserve.kernels.linear import _gemv_split_k_kernel
from qwenserve.kernels.moe_configs import get_moe_config


@triton.jit
def _stream_read_kernel(x_ptr, out_ptr, n_blocks, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """Sum of the buffer, blocks dealt round-robin to the programs, UNROLL independent loads in flight."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for b in range(pid * UNROLL, n_blocks, nprog * UNROLL):
        for u in tl.static_range(UNROLL):
            blk = b + u
            acc += tl.load(x_ptr + blk.to(tl.int64) * BLOCK + offs, mask=(blk < n_blocks) & (offs >= 0), other=0.0)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


def gemv_splitk(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, block_n: int, block_k: int, splits: int,
                warps: int) -> None:
    """The engine's split-K GEMV (qwenserve.kernels.linear) at a given tile: fp32 partials in out[split]."""
    n, k = w.shape
    _gemv_split_k_kernel[(n // block_n, splits)](x, w, out, n, w.stride(0), K_PER_SPLIT=k // splits, BLOCK_N=block_n,
                                                 BLOCK_K=block_k, num_warps=warps)


def stream_read(x: torch.Tensor, out: torch.Tensor, programs: int, block: int, unroll: int, warps: int) -> None:
    n_blocks = x.numel() // block
    _stream_read_kernel[(programs,)](x, out, n_blocks, BLOCK=block, UNROLL=unroll, num_warps=warps)


def time_graph(calls: list[Callable[[], None]], reps: int) -> float:
    """Microseconds per call: the calls captured into one graph, replayed `reps` times."""
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps / len(calls)


def report(name: str, nbytes: int, us: float) -> None:
    print(f"{name:<58} {us:7.2f} us  {nbytes / us / 1e6:5.2f} TB/s", flush=True)


GEMV_TILES = [(16, 256, 4, 4), (16, 256, 2, 4), (16, 256, 1, 4), (32, 256, 2, 4), (32, 256, 4, 8), (16, 512, 2, 4),
              (8, 512, 4, 4), (8, 512, 2, 2), (32, 128, 4, 4), (64, 128, 4, 8), (16, 128, 8, 2), (8, 256, 8, 2)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"{torch.cuda.get_device_name(dev)}, {sms} SMs")
    out = torch.empty(64 * sms, device=dev)
    shapes = {"o_proj [2048, 4096]": (2048, 4096), "qkv [5120, 2048]": (5120, 2048),
              "8 experts' w2 [8x2048, 768]": (8 * 2048, 768), "8 experts' w13 [8x1536, 2048]": (8 * 1536, 2048)}
    for name, (n, k) in shapes.items():
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(args.layers)]
        nbytes = n * k * 2
        for programs_per_sm in (1, 2, 4, 8):
            for block, unroll, warps in ((2048, 4, 8), (4096, 2, 8), (1024, 8, 4)):
                us = time_graph([lambda w=w, pp=programs_per_sm, b=block, u=unroll, nw=warps: stream_read(
                    w, out, pp * sms, b, u, nw) for w in ws], args.reps)
                report(f"{name} read {programs_per_sm}/SM blk {block} x{unroll} w{warps}", nbytes, us)
        if n in (2048, 5120):
            x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
            report(f"{name} cuBLAS F.linear, 1 row", nbytes, time_graph([lambda w=w, x=x: F.linear(x, w) for w in ws], args.reps))
            part = torch.empty(16, n, device=dev)
            for bn, bk, splits, warps in GEMV_TILES:
                if k % (bk * splits) == 0:
                    us = time_graph([lambda w=w, x=x, p=part, t=(bn, bk, splits, warps): gemv_splitk(x, w, p, *t) for w in ws],
                                    args.reps)
                    report(f"{name} Triton GEMV n{bn} k{bk} split{splits} w{warps}", nbytes, us)
        del ws
        torch.cuda.empty_cache()

    # The engine's batch-1 MoE on 8 layers' worth of experts (routing in GEMM1, then GEMM2).
    num_experts, inter, hidden, top_k = 128, 768, 2048, 8
    cfg = get_moe_config(1, num_experts, inter, hidden, top_k)
    w13s = [torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=torch.bfloat16) * 0.02
            for _ in range(args.layers)]
    w2s = [torch.randn(num_experts, hidden, inter, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(args.layers)]
    h = torch.randn(1, hidden, device=dev, dtype=torch.bfloat16)
    logits = torch.randn(1, num_experts, device=dev, dtype=torch.bfloat16)
    nbytes = top_k * 3 * inter * hidden * 2
    us = time_graph([lambda a=a, b=b: moe._route_in_gemm1(h, logits, a, b, top_k, True, cfg)
                     for a, b in zip(w13s, w2s, strict=True)], args.reps)
    report(f"MoE batch 1 (GEMM1 + GEMM2), {cfg}", nbytes, us)


if __name__ == "__main__":
    main()
