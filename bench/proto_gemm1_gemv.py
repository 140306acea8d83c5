"""Prototype for the next device session (not used by the engine unless imported): at one or two decode
tokens, GEMM1 (and optionally GEMM2) as a GEMV instead of a tl.dot GEMM.

Why: in the batch-1 decode graph GEMM1 (routing + gate/up of the token's 8 experts, 50 MB) takes ~20.5 us per
layer, ~2.45 TB/s, while the split-K GEMVs of qkv / o_proj stream at ~3 TB/s alone. Its tiles are BLOCK_M = 16
rows (one real) through a 6-stage pipeline of 4 KB loads per program; here each program routes its pair, then
loads its whole [BLOCK_N, K] gate and up slices at once (BLOCK_N = 4: 32 KB, as the o_proj GEMV does) and
reduces them in registers: every byte of the layer's expert weights is requested right after the wait.

Importing this module wraps qwenserve.kernels.moe._route_in_gemm1; BLOCK_N = 0 (the default) keeps the tiled
GEMM1, so bench/ab_decode.py can A/B it:
    PYTHONPATH=. python3 bench/ab_decode.py CONFIG --context 512 32768 --variant base: \\
        --variant gemv4:proto_gemm1_gemv.BLOCK_N=4 --variant gemv8w8:proto_gemm1_gemv.BLOCK_N=8,proto_gemm1_gemv.WARPS=8 \
        --variant gemv2-16:proto_gemm1_gemv.BLOCK_N2=16
Correctness (against the tiled GEMM1 on a GPU, or on the CPU with TRITON_INTERPRET=1 and a small shape):
    PYTHONPATH=. python3 bench/proto_gemm1_gemv.py [--small]
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from qwenserve.kernels import moe
from qwenserve.kernels.moe import MoEConfig
from qwenserve.kernels.pdl import pdl_launch, pdl_start, pdl_wait

BLOCK_N = 0  # 0: the engine's tiled GEMM1
WARPS = 4
BLOCK_N2 = 0  # 0: the engine's tiled GEMM2; else GEMM2 as _gemv2_kernel with this many output columns a program
WARPS2 = 4


@triton.jit(do_not_specialize=["numel"])
def _route_gemv1_kernel(
    logits_ptr, a_ptr, w_ptr, act_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_rows_ptr, numel, N, K,
    stride_am, stride_we, stride_wn, stride_actm,
    NUM_EXPERTS: tl.constexpr, E_P2: tl.constexpr, TOP_K: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K_P2: tl.constexpr, PDL_MODE: tl.constexpr = 0,
):  # fmt: skip
    """_route_gemm1_kernel's contract (same outputs and layout for GEMM2), one pair x BLOCK_N columns per program."""
    pdl_start(PDL_MODE)
    pdl_wait(PDL_MODE)
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    token = p // TOP_K
    e = tl.arange(0, E_P2)
    e_ok = e < NUM_EXPERTS
    logit = tl.load(logits_ptr + token * NUM_EXPERTS + e[None, :], mask=e_ok[None, :], other=float("-inf"))
    top_w, top_i = moe._softmax_topk(logit.to(tl.float32), tl.arange(0, 1) < 1, e, e_ok, 1, E_P2, TOP_K, RENORM)
    mine = tl.arange(0, TOP_K)[None, :] == p % TOP_K
    expert = tl.sum(tl.sum(tl.where(mine, top_i, 0), 1), 0)
    if pid_n == 0:
        r = tl.arange(0, BLOCK_M)
        weight = tl.sum(tl.sum(tl.where(mine, top_w, 0.0), 1), 0)
        tl.store(weights_ptr + p, weight.to(weights_ptr.dtype.element_ty))
        tl.store(expert_ids_ptr + p, expert)
        tl.store(sorted_ids_ptr + p * BLOCK_M + r, tl.where(r == 0, p, numel))
        if p == 0:
            tl.store(num_rows_ptr, numel * BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, K_P2)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    g_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    g = tl.load(g_ptrs, mask=mask, other=0.0)
    u = tl.load(g_ptrs + N * stride_wn, mask=mask, other=0.0)
    x = tl.load(a_ptr + token * stride_am + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
    gate = tl.sum(g.to(tl.float32) * x[None, :], 1)
    up = tl.sum(u.to(tl.float32) * x[None, :], 1)
    act = gate * tl.sigmoid(gate) * up
    tl.store(act_ptr + (p * BLOCK_M).to(tl.int64) * stride_actm + offs_n, act.to(act_ptr.dtype.element_ty),
             mask=offs_n < N)  # fmt: skip


@triton.jit
def _gemv2_kernel(
    act_ptr, w_ptr, out_ptr, weights_ptr, expert_ids_ptr, N, K, stride_actm, stride_we, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K_P2: tl.constexpr, PDL_MODE: tl.constexpr = 0,
):  # fmt: skip
    """GEMM2 after a routing GEMM1 (one row block per pair, its row 0 real), as a GEMV per pair:
    out[p, n] = weight[p] * (act[p * BLOCK_M] . w2[e_p, n]), the whole K slice loaded at once after the wait.
    (The eighth-session variant that loaded w2 before the wait measured slower; this one waits first.)"""
    pdl_start(PDL_MODE)
    pdl_wait(PDL_MODE)
    p = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, K_P2)
    expert = tl.load(expert_ids_ptr + p).to(tl.int64)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = tl.load(w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :], mask=mask,
                other=0.0)  # fmt: skip
    a = tl.load(act_ptr + (p * BLOCK_M).to(tl.int64) * stride_actm + offs_k, mask=offs_k < K, other=0.0)
    acc = tl.sum(w.to(tl.float32) * a.to(tl.float32)[None, :], 1)
    acc = acc * tl.load(weights_ptr + p).to(tl.float32)
    tl.store(out_ptr + p * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)


_tiled_route_in_gemm1 = moe._route_in_gemm1


def route_in_gemm1(
    h: torch.Tensor, logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int, renormalize: bool,
    cfg: MoEConfig,
) -> torch.Tensor:  # fmt: skip
    """moe._route_in_gemm1 with GEMM1 as _route_gemv1_kernel when BLOCK_N > 0, GEMM2 as _gemv2_kernel when
    BLOCK_N2 > 0."""
    if not BLOCK_N and not BLOCK_N2:
        return _tiled_route_in_gemm1(h, logits, w13, w2, top_k, renormalize, cfg)
    num_experts, two_inter, hidden_size = w13.shape
    inter, num_pairs, device = two_inter // 2, h.shape[0] * top_k, h.device
    bufs = moe.route_buffers(h, num_pairs, inter, cfg.block_m)
    if BLOCK_N:
        _route_gemv1_kernel[(num_pairs, triton.cdiv(inter, BLOCK_N))](
            logits, h, w13, *bufs, num_pairs, inter, hidden_size, h.stride(0), w13.stride(0), w13.stride(1),
            bufs.act.stride(0), NUM_EXPERTS=num_experts, E_P2=triton.next_power_of_2(num_experts), TOP_K=top_k,
            RENORM=renormalize, BLOCK_M=cfg.block_m, BLOCK_N=BLOCK_N, K_P2=triton.next_power_of_2(hidden_size),
            num_warps=WARPS, **pdl_launch(device, "route_gemm1"),
        )  # fmt: skip
    else:
        moe.launch_route_gemm1(h, logits, w13, bufs, top_k, renormalize, cfg)
    pair_out = torch.empty(num_pairs, hidden_size, dtype=h.dtype, device=device)
    if BLOCK_N2:
        _gemv2_kernel[(num_pairs, triton.cdiv(hidden_size, BLOCK_N2))](
            bufs.act, w2, pair_out, bufs.weights, bufs.expert_ids, hidden_size, inter, bufs.act.stride(0),
            w2.stride(0), w2.stride(1), pair_out.stride(0), BLOCK_M=cfg.block_m, BLOCK_N=BLOCK_N2,
            K_P2=triton.next_power_of_2(inter), num_warps=WARPS2, **pdl_launch(device, "gemm2"),
        )  # fmt: skip
    else:
        moe._launch_gemm2(bufs.act, w2, pair_out, bufs.sorted_ids, bufs.expert_ids, bufs.num_rows, bufs.weights, cfg)
    return pair_out.view(h.shape[0], top_k, hidden_size)


moe._route_in_gemm1 = route_in_gemm1


def check(small: bool) -> None:
    """The GEMV's terms against the tiled GEMM1's, for 1 and 2 tokens and a few tilings."""
    global BLOCK_N, WARPS, BLOCK_N2, WARPS2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    experts, top_k, inter, hidden = (16, 4, 96, 256) if small else (128, 8, 768, 2048)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    w13 = (torch.randn(experts, 2 * inter, hidden) * 0.02).to(device, dtype)
    w2 = (torch.randn(experts, hidden, inter) * 0.03).to(device, dtype)
    cfg = MoEConfig(16, 16, 64, 2, 3, 64, 64, 4, 3)
    for tokens in (1, 2):
        h = torch.randn(tokens, hidden).to(device, dtype)
        logits = torch.randn(tokens, experts, device=device, dtype=torch.float32)
        BLOCK_N = BLOCK_N2 = 0
        ref = route_in_gemm1(h, logits, w13, w2, top_k, True, cfg).float()
        for BLOCK_N, WARPS, BLOCK_N2, WARPS2 in ((4, 4, 0, 4), (8, 8, 0, 4), (32, 4, 0, 4), (0, 4, 16, 4),
                                                 (4, 4, 32, 8)):  # fmt: skip
            out = route_in_gemm1(h, logits, w13, w2, top_k, True, cfg).float()
            err = (out - ref).abs().max().item()
            print(f"tokens {tokens} GEMM1 BLOCK_N {BLOCK_N} warps {WARPS}, GEMM2 BLOCK_N {BLOCK_N2} warps {WARPS2}: "
                  f"max |diff| {err:.2e} (terms up to {ref.abs().max().item():.2e})", flush=True)  # fmt: skip
            torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-2)
    BLOCK_N = BLOCK_N2 = 0
    print("ok")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="a small shape (for TRITON_INTERPRET=1 on the CPU)")
    check(parser.parse_args().small)
