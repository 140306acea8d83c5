"""Prototype for the next device session (not used by the engine unless imported): at one or two decode
tokens, GEMM2 routes its pair itself and prefetches its whole w2 tile into L2 before its PDL wait.

Why: at batch 1 each layer's two expert GEMMs stream 75 MB in ~30 us (~2.5 TB/s of the H200's 4.8), and
GEMM2 (25 MB) cannot request a byte before GEMM1 has finished, so each layer pays GEMM2's ramp and tail
on top of GEMM1's. Under PDL, GEMM2's programs become resident while GEMM1 still runs (GEMM1 triggers
them after its own wait). The router logits are visible by then (their kernel finished before GEMM1's
wait returned), so each GEMM2 program can find its expert (the softmax top-k GEMM1 computes, bit for
bit) and ask for its [BLOCK_N, K] slice of w2 (64 x 768 bf16 rows: one contiguous 96 KB) with
`prefetch.global.L2` before it waits: no registers or shared memory held, the bytes stream while GEMM1
runs, and after the wait the tile loop reads L2. The ninth session's attempt loaded the tile into
registers as a GEMV instead (+221 to +461 us). The risk here: GEMM1's 50 MB stream evicting the
prefetched 25 MB (H200 L2: 50 MB), hence the evict_last variant.

Importing this module wraps qwenserve.kernels.moe._route_in_gemm1; MODE selects GEMM2:
    0  the engine's GEMM2 (default)
    1  the routing GEMM2 without prefetch (the cost of routing again, pre-wait)
    2  + prefetch.global.L2 of the w2 tile before the wait
    3  + prefetch.global.L2::evict_last
A/B in the decode graph (the tool rotates the variant order every round):
    PYTHONPATH=. python3 bench/ab_decode.py CONFIG --context 512 32768 --batch 1 2 --variant base: \\
        --variant route:proto_gemm2_prefetch.MODE=1 --variant pf:proto_gemm2_prefetch.MODE=2 \\
        --variant pf_last:proto_gemm2_prefetch.MODE=3
Correctness against the engine's GEMM2 (GPU; or MODE 1 only on the CPU with TRITON_INTERPRET=1 and --small):
    PYTHONPATH=. python3 bench/proto_gemm2_prefetch.py [--small]
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from qwenserve.kernels import moe
from qwenserve.kernels.moe import MoEConfig
from qwenserve.kernels.pdl import pdl_launch, pdl_start, pdl_wait

MODE = 0
_LINE = 128  # bytes per prefetched L2 line


@triton.jit
def _prefetch_l2(ptrs, EVICT_LAST: tl.constexpr):
    """Ask L2 for the lines at ptrs (no data comes back to the SM)."""
    if EVICT_LAST:
        tl.inline_asm_elementwise(
            "prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False,
            pack=1,
        )  # fmt: skip
    else:
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
        )


@triton.jit(do_not_specialize=["numel"])
def _route_gemm2_kernel(
    logits_ptr, act_ptr, w_ptr, out_ptr, numel, N, K, stride_actm, stride_we, stride_wn, stride_om,
    NUM_EXPERTS: tl.constexpr, E_P2: tl.constexpr, TOP_K: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LINE_ELEMS: tl.constexpr,
    LINES_PER_ROW: tl.constexpr, LINES_P2: tl.constexpr, PREFETCH: tl.constexpr, EVICT_LAST: tl.constexpr, PDL_MODE: tl.constexpr = 0,
):  # fmt: skip
    """out[p, n] = weight[p] * (act[p * BLOCK_M] . w2[expert[p], n]) for the routing GEMM1's layout,
    with pair p's expert and weight from its own routing (the top-k moe._route_gemm1_kernel computes)."""
    pdl_start(PDL_MODE)
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    p = pid // tiles_n
    pid_n = pid % tiles_n
    e = tl.arange(0, E_P2)
    e_ok = e < NUM_EXPERTS
    logit = tl.load(logits_ptr + (p // TOP_K) * NUM_EXPERTS + e[None, :], mask=e_ok[None, :], other=float("-inf"))
    top_w, top_i = moe._softmax_topk(logit.to(tl.float32), tl.arange(0, 1) < 1, e, e_ok, 1, E_P2, TOP_K, RENORM)
    mine = tl.arange(0, TOP_K)[None, :] == p % TOP_K
    expert = tl.sum(tl.sum(tl.where(mine, top_i, 0), 1), 0).to(tl.int64)
    weight = tl.sum(tl.sum(tl.where(mine, top_w, 0.0), 1), 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if PREFETCH:
        line = tl.arange(0, LINES_P2)
        row = pid_n * BLOCK_N + line // LINES_PER_ROW
        col = (line % LINES_PER_ROW) * LINE_ELEMS
        ok = (line < BLOCK_N * LINES_PER_ROW) & (row < N)
        _prefetch_l2(w_ptr + expert * stride_we + tl.where(ok, row, 0) * stride_wn + tl.where(ok, col, 0), EVICT_LAST)
    pdl_wait(PDL_MODE)
    r = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    real = (r == 0)[:, None]
    a_ptrs = act_ptr + (p * BLOCK_M + r)[:, None].to(tl.int64) * stride_actm + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=real & (offs_k[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & n_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = acc * weight.to(out_ptr.dtype.element_ty).to(tl.float32)  # GEMM1 stores the weight in this dtype
    tl.store(
        out_ptr + p.to(tl.int64) * stride_om + offs_n[None, :] + r[:, None] * 0,
        acc.to(out_ptr.dtype.element_ty),
        mask=real & n_mask[None, :],
    )


_engine_route_in_gemm1 = moe._route_in_gemm1


def route_in_gemm1(
    h: torch.Tensor, logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int, renormalize: bool,
    cfg: MoEConfig,
) -> torch.Tensor:  # fmt: skip
    """moe._route_in_gemm1 with GEMM2 as _route_gemm2_kernel when MODE > 0."""
    if not MODE:
        return _engine_route_in_gemm1(h, logits, w13, w2, top_k, renormalize, cfg)
    num_experts, two_inter, hidden_size = w13.shape
    inter, num_pairs = two_inter // 2, h.shape[0] * top_k
    bufs = moe.route_buffers(h, num_pairs, inter, cfg.block_m)
    moe.launch_route_gemm1(h, logits, w13, bufs, top_k, renormalize, cfg)
    pair_out = torch.empty(num_pairs, hidden_size, dtype=h.dtype, device=h.device)
    lines_per_row = triton.cdiv(inter * w2.element_size(), _LINE)
    _route_gemm2_kernel[(num_pairs * triton.cdiv(hidden_size, cfg.n2),)](
        logits, bufs.act, w2, pair_out, num_pairs, hidden_size, inter, bufs.act.stride(0), w2.stride(0),
        w2.stride(1), pair_out.stride(0), NUM_EXPERTS=num_experts, E_P2=triton.next_power_of_2(num_experts),
        TOP_K=top_k, RENORM=renormalize, BLOCK_M=cfg.block_m, BLOCK_N=cfg.n2, BLOCK_K=cfg.k2,
        LINE_ELEMS=_LINE // w2.element_size(), LINES_PER_ROW=lines_per_row, LINES_P2=triton.next_power_of_2(cfg.n2 * lines_per_row), PREFETCH=MODE >= 2,
        EVICT_LAST=MODE == 3, num_warps=cfg.warps2, num_stages=cfg.stages2, **pdl_launch(h.device, "gemm2"),
    )  # fmt: skip
    return pair_out.view(h.shape[0], top_k, hidden_size)


moe._route_in_gemm1 = route_in_gemm1


def check(small: bool) -> None:
    """Every MODE's terms against the engine's GEMM2, for 1 and 2 tokens (bit for bit on the GPU)."""
    global MODE
    device = "cuda" if torch.cuda.is_available() else "cpu"
    experts, top_k, inter, hidden = (16, 4, 96, 256) if small else (128, 8, 768, 2048)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    w13 = (torch.randn(experts, 2 * inter, hidden) * 0.02).to(device, dtype)
    w2 = (torch.randn(experts, hidden, inter) * 0.03).to(device, dtype)
    cfg = MoEConfig(16, 16, 64, 2, 6, 64, 64, 4, 5)
    modes = (1, 2, 3) if device == "cuda" else (1,)  # the interpreter runs no inline PTX
    for tokens in (1, 2):
        h = torch.randn(tokens, hidden).to(device, dtype)
        logits = torch.randn(tokens, experts, device=device, dtype=torch.float32)
        MODE = 0
        ref = route_in_gemm1(h, logits, w13, w2, top_k, True, cfg)
        for MODE in modes:
            out = route_in_gemm1(h, logits, w13, w2, top_k, True, cfg)
            err = (out.float() - ref.float()).abs().max().item()
            print(f"tokens {tokens} MODE {MODE}: max |diff| {err:.2e} (terms up to {ref.abs().max().item():.2e})")
            if device == "cuda":
                assert torch.equal(out, ref), "the routing GEMM2 should give the engine's terms bit for bit"
            else:
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    MODE = 0
    print("ok")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="a small shape (for TRITON_INTERPRET=1 on the CPU)")
    check(parser.parse_args().small)
