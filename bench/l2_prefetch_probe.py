"""Does a weight pulled into L2 ahead of time make the batch-1 projections faster, and what does
issuing the prefetch cost? Isolated kernels on a GPU, durations from the profiler (median of runs).

Usage on a GPU machine: PYTHONPATH=. python3 bench/l2_prefetch_probe.py
Each case: flush L2 (write 512 MB), optionally prefetch or read the weight, idle the GPU ~10 us
(torch.cuda._sleep), then the projection F.linear([1, K], W [N, K]).

Result (H200, 2026-11-30): cuBLAS o_proj 8.3 + 1.5 us cold, 5.8 + 1.5 us with the weight in L2;
qkv 9.7 cold, 6.4 in L2; a bulk prefetch of either weight takes ~3 us to issue (16-264 programs).
Issued from inside the decode graph's own norm / RoPE kernels it cost more than it saved
(+66 to +570 us per step, docs/BENCHMARKS.md), so the engine does not prefetch.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.profiler import ProfilerActivity, profile


def prefetch_args(tensor: torch.Tensor | None, enabled: bool = True) -> tuple[torch.Tensor | None, int]:
    """(the tensor's bytes as a flat uint8 view, their count) for a kernel's prefetch arguments, or
    (None, 0): no prefetch (switched off, no Hopper, not contiguous or not 16-byte aligned)."""
    if tensor is None or not enabled or not tensor.is_contiguous():
        return None, 0
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.data_ptr() % 16 or nbytes % 16 or nbytes >= 1 << 31:
        return None, 0
    return tensor.view(-1).view(torch.uint8), nbytes


@triton.jit
def prefetch_l2(ptr, nbytes, part, num_parts, CHUNKS: tl.constexpr, EVICT_LAST: tl.constexpr):
    """Issue this part's share (1 / num_parts, in CHUNKS pieces) of a bulk L2 prefetch of the
    bytes ptr[0:nbytes] (a uint8 pointer; 16-byte aligned base and total, see prefetch_args)."""
    chunk = tl.cdiv(tl.cdiv(nbytes, num_parts * CHUNKS), 16) * 16  # whole 16-byte units keep starts aligned
    start = (part * CHUNKS + tl.arange(0, CHUNKS)).to(tl.int64) * chunk
    size = tl.minimum(chunk, nbytes - start).to(tl.int32)  # <= 0 past the end: skipped
    if EVICT_LAST:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .b64 pol; setp.gt.s32 p, $2, 0; "
            "createpolicy.fractional.L2::evict_last.b64 pol, 1.0; "
            "@p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol; mov.u32 $0, 0; }",
            "=r,l,r", [ptr + start, size], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip
    else:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [ptr + start, size], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip


@triton.jit
def _prefetch_kernel(ptr, nbytes, CHUNKS: tl.constexpr, EVICT_LAST: tl.constexpr):
    prefetch_l2(ptr, nbytes, tl.program_id(0), tl.num_programs(0), CHUNKS, EVICT_LAST)


def prefetch(w: torch.Tensor, programs: int, warps: int = 1) -> None:
    data, nbytes = prefetch_args(w)
    assert data is not None
    _prefetch_kernel[(programs,)](data, nbytes, CHUNKS=32 * warps, EVICT_LAST=False, num_warps=warps)


def main() -> None:
    dev = torch.device("cuda")
    flush = torch.empty(512 << 20, dtype=torch.uint8, device=dev)
    shapes = {"o_proj": (2048, 4096), "qkv": (5120, 2048)}
    weights = {k: torch.randn(n, kk, device=dev, dtype=torch.bfloat16) for k, (n, kk) in shapes.items()}
    xs = {k: torch.randn(1, kk, device=dev, dtype=torch.bfloat16) for k, (n, kk) in shapes.items()}
    cases = {
        "cold": lambda w: None,
        "read first": lambda w: w.sum(),
        "prefetch 16": lambda w: prefetch(w, 16),
        "prefetch 36": lambda w: prefetch(w, 36),
        "prefetch 132": lambda w: prefetch(w, 132),
        "prefetch 264": lambda w: prefetch(w, 264),
        "prefetch 132x4w": lambda w: prefetch(w, 132, 4),
    }
    for name, w in weights.items():
        for case, before in cases.items():
            for _ in range(3):
                flush.fill_(1)
                before(w)
                torch.cuda._sleep(20000)
                F.linear(xs[name], w)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    flush.fill_(1)
                    before(w)
                    torch.cuda._sleep(20000)
                    F.linear(xs[name], w)
                torch.cuda.synchronize()
            durations: dict[str, list[float]] = defaultdict(list)
            for ev in prof.events():
                if ev.device_type.name == "CUDA":
                    durations[ev.name].append(ev.device_time)
            parts = []
            for kernel, ds in durations.items():
                if "fill" in kernel or "sleep" in kernel.lower() or "spin" in kernel.lower():
                    continue
                parts.append(f"{kernel[:60]} {statistics.median(ds):.1f} us (x{len(ds) // 20})")
            print(f"{name} {case}: " + " | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
