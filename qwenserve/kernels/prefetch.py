"""Side-stream L2 prefetch of the weight the next streaming kernel reads.

At batch 1 a decode step alternates between weight streaming (projections, experts: bound by
HBM bandwidth) and latency-bound kernels that barely touch memory (q/k-norm + RoPE, attention
over a short context, its merge). A small kernel on a second stream, forked from the main
stream just before such a stretch and joined just before the projection, pulls that
projection's weight into L2 with Hopper's bulk prefetch (`cp.async.bulk.prefetch.L2`) while the
bus would otherwise sit idle. It runs beside the main stream's kernels (a parallel branch of the
CUDA graph), so issuing it costs the step nothing; cuBLAS then reads the weight from L2
(o_proj: 5.8 instead of 8.3 us on an H200, bench/l2_prefetch_probe.py).

Issued from inside the step's own kernels the same prefetch lost (docs/BENCHMARKS.md, the fifth
session): the issuing programs sat on the critical path.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# A/B switches (bench/ab_decode.py).
PREFETCH_O_PROJ = True  # while q/k-norm + RoPE, attention and the merge run
PREFETCH_NEXT_QKV = False  # the next layer's qkv, while the MoE block runs
PREFETCH_PROGRAMS = 16
PREFETCH_MAX_TOKENS = 16  # decode-sized steps only: a prefill chunk's projections are compute-bound

_side_streams: dict[int, torch.cuda.Stream] = {}
_forked: set[int] = set()
_capable: dict[int, bool] = {}


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _supported(tensor: torch.Tensor) -> bool:
    """Bulk L2 prefetch exists from sm_90; the Triton interpreter has no inline PTX; the bytes must be
    one contiguous, 16-byte aligned run."""
    if tensor.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or not tensor.is_contiguous():
        return False
    index = _index(tensor.device)
    if index not in _capable:
        _capable[index] = torch.cuda.get_device_capability(index)[0] >= 9
    nbytes = tensor.numel() * tensor.element_size()
    return _capable[index] and tensor.data_ptr() % 16 == 0 and nbytes % 16 == 0 and nbytes < 1 << 31


@triton.jit
def _prefetch_kernel(ptr, nbytes, CHUNKS: tl.constexpr):
    """Program p issues its 1 / num_programs share of the bytes, as CHUNKS bulk prefetches."""
    part = tl.program_id(0)
    chunk = tl.cdiv(tl.cdiv(nbytes, tl.num_programs(0) * CHUNKS), 16) * 16  # 16-byte units keep starts aligned
    start = (part * CHUNKS + tl.arange(0, CHUNKS)).to(tl.int64) * chunk
    size = tl.minimum(chunk, nbytes - start).to(tl.int32)  # <= 0 past the end: skipped
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptr + start, size], dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


def prefetch_l2(weight: torch.Tensor, num_tokens: int, kind: str) -> None:
    """Same contract as ops.prefetch_l2: fork a side stream off the current one and prefetch `weight`
    into L2 on it (a no-op when `kind`'s switch is off, for large steps, or where unsupported).
    join_prefetch joins it back."""
    enabled = {"o_proj": PREFETCH_O_PROJ, "next_qkv": PREFETCH_NEXT_QKV}[kind]
    if not enabled or num_tokens > PREFETCH_MAX_TOKENS or not _supported(weight):
        return
    index = _index(weight.device)
    main = torch.cuda.current_stream(index)
    side = _side_streams.get(index)
    if side is None:
        side = _side_streams[index] = torch.cuda.Stream(index)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        data = weight.view(-1).view(torch.uint8)
        _prefetch_kernel[(PREFETCH_PROGRAMS,)](data, data.numel(), CHUNKS=32, num_warps=1)
    _forked.add(index)


def join_prefetch(device: torch.device) -> None:
    """Make the current stream wait for an outstanding prefetch (a CUDA graph capture must rejoin
    every stream it forked; the wait also orders nothing else)."""
    if device.type != "cuda":
        return
    index = _index(device)
    if index in _forked:
        _forked.discard(index)
        torch.cuda.current_stream(index).wait_stream(_side_streams[index])
