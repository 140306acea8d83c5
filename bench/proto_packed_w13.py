"""Prototype (not used by the engine): the batch-1 routing GEMM1 reading w13 packed tile by tile.

Why: at one token GEMM1 streams the 8 chosen experts' w13 (50 MB) at ~2.5-2.8 TB/s, while one plain
streaming launch of 50 MB reaches ~3.7 TB/s on the H200 (bench/read_ceiling.py). In w13's own
layout [E, 2I, K] each program walks 32 rows of 4 KB (16 gate + 16 up rows) 128 bytes at a time, so
every k-step touches 32 DRAM pages at once. Packed as [E, I / BN, K / BK, 2, BN, BK], the tile a
program loads at k-step kb is one contiguous 2 * BN * BK * 2 bytes (4 KB at 16 x 64), and its whole
stream is one contiguous run. The products are the same (same tiles, same order): bit for bit.

Usage on a GPU machine: PYTHONPATH=. python3 bench/proto_packed_w13.py [--layers 8] [--reps 20]
Prints, per tile, the engine's kernel and the packed one on `--layers` layers' worth of experts in one
CUDA graph (more bytes than L2 holds), and checks the packed act equals the engine's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from read_ceiling import report, stream_read, time_graph  # noqa: E402

from qwenserve.kernels import moe  # noqa: E402


def pack_w13(w13: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    """[E, 2I, K] -> [E, I / BN, K / BK, 2, BN, BK]: each program's k-step tile (gate and up) contiguous."""
    experts, two_inter, k = w13.shape
    inter = two_inter // 2
    w = w13.view(experts, 2, inter // block_n, block_n, k // block_k, block_k)
    return w.permute(0, 2, 4, 1, 3, 5).contiguous()


@triton.jit
def _packed_route_gemm1_kernel(
    logits_ptr, a_ptr, w_ptr, act_ptr, numel, N, K, stride_am, stride_actm,
    NUM_EXPERTS: tl.constexpr, E_P2: tl.constexpr, TOP_K: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """moe._route_gemm1_kernel (PDL off) with w13 packed by pack_w13(BLOCK_N, BLOCK_K)."""
    pid = tl.program_id(0)
    tiles_n = N // BLOCK_N
    p = pid // tiles_n
    pid_n = pid % tiles_n
    expert, _ = moe._pair_route(logits_ptr, p, NUM_EXPERTS, E_P2, TOP_K, RENORM)
    r = tl.arange(0, BLOCK_M)
    offs_m = p * BLOCK_M + r
    m_mask = r == 0
    tok = (tl.where(m_mask, p, numel) // TOP_K).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + tok[:, None] * stride_am + offs_k[None, :]
    tile = 2 * BLOCK_N * BLOCK_K
    g_ptrs = w_ptr + (expert * tiles_n + pid_n) * (K * 2 * BLOCK_N) + offs_n[None, :] * BLOCK_K + offs_k[:, None]
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, K // BLOCK_K):
        a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
        g = tl.load(g_ptrs)
        u = tl.load(g_ptrs + BLOCK_N * BLOCK_K)
        acc_g = tl.dot(a, g, acc_g)
        acc_u = tl.dot(a, u, acc_u)
        a_ptrs += BLOCK_K
        g_ptrs += tile
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    cols = pid_n * BLOCK_N + offs_n
    tl.store(
        act_ptr + offs_m[:, None].to(tl.int64) * stride_actm + cols[None, :],
        act.to(act_ptr.dtype.element_ty),
        mask=m_mask[:, None] & (cols < N)[None, :],
    )


def launch(packed: bool, h: torch.Tensor, logits: torch.Tensor, w: torch.Tensor, act: torch.Tensor,
           tile: tuple[int, int, int, int], top_k: int, inter: int, num_experts: int) -> None:  # fmt: skip
    """One routing GEMM1 of one token, the engine's kernel (w13 as is) or the packed one."""
    bn, bk, warps, stages = tile
    num_pairs = h.shape[0] * top_k
    common = dict(NUM_EXPERTS=num_experts, E_P2=triton.next_power_of_2(num_experts), TOP_K=top_k, RENORM=True,
                  BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)  # fmt: skip
    grid = (num_pairs * (inter // bn),)
    if packed:
        _packed_route_gemm1_kernel[grid](logits, h, w, act, num_pairs, inter, h.shape[1], h.stride(0), act.stride(0),
                                         **common)  # fmt: skip
    else:
        moe._route_gemm1_kernel[grid](logits, h, w, act, num_pairs, inter, h.shape[1], h.stride(0), w.stride(0),
                                      w.stride(1), act.stride(0), **common)  # fmt: skip


TILES = [(16, 64, 2, 6), (16, 128, 2, 4), (16, 64, 4, 6), (32, 64, 4, 5), (16, 256, 4, 3), (32, 128, 4, 4)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    dev = torch.device("cuda")
    num_experts, inter, hidden, top_k = 128, 768, 2048, 8
    torch.manual_seed(0)
    w13s = [torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=torch.bfloat16) * 0.02
            for _ in range(args.layers)]  # fmt: skip
    h = torch.randn(1, hidden, device=dev, dtype=torch.bfloat16)
    logits = torch.randn(args.layers, 1, num_experts, device=dev, dtype=torch.float32)
    acts = [torch.empty(top_k * 16, inter, device=dev, dtype=torch.bfloat16) for _ in range(2)]
    nbytes = top_k * 2 * inter * hidden * 2
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    flat = [w.view(-1)[: nbytes // 2] for w in w13s]
    out = torch.empty(64 * sms, device=dev)
    report("ceiling: plain read of 50 MB, 4/SM blk 2048 x4 w8", nbytes, time_graph(
        [lambda f=f: stream_read(f, out, 4 * sms, 2048, 4, 8) for f in flat], args.reps))  # fmt: skip
    for tile in TILES:
        packed = [pack_w13(w, tile[0], tile[1]) for w in w13s]
        for is_packed, ws in ((False, w13s), (True, packed), (False, w13s), (True, packed)):
            calls = [lambda w=w, lg=lg, pk=is_packed, t=tile: launch(pk, h, lg, w, acts[pk], t, top_k, inter, num_experts)
                     for w, lg in zip(ws, logits, strict=True)]  # fmt: skip
            us = time_graph(calls, args.reps)
            report(f"GEMM1 {'packed' if is_packed else 'engine'} {tile}", nbytes, us)
        real = torch.arange(top_k, device=dev) * 16
        diff = (acts[0][real].float() - acts[1][real].float()).abs().max().item()
        print(f"  packed vs engine act, max |diff| {diff:.2e}{'' if diff == 0 else '  (NOT bit for bit)'}", flush=True)
        del packed
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
