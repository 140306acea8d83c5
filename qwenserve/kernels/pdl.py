"""Programmatic dependent launch (PDL) for the decode path's kernels, Hopper and later.

A batch-1 decode step is ~430 kernels of a few microseconds each; between two of them the GPU
drains one grid and ramps the next even inside a CUDA graph. With PDL a kernel is launched
while its predecessor still runs: its programs start, load what no earlier kernel writes (the
weights: the GEMVs' whole weight slice) and then block in `wait` until the predecessor's grid
has finished and its stores are visible. So the next kernel's ramp and weight stream overlap
the previous kernel's tail.

The contract every kernel launched with PDL keeps (the kernels call `pdl_start` / `pdl_wait`):
- before `pdl_wait`: no store, and no load of anything a kernel of the step writes (only
  weights and other constants);
- every program reaches `pdl_wait` before it exits, so a kernel never finishes before its
  predecessor, and waiting on the previous kernel transitively waits on all earlier ones.
One exception: a kernel whose predecessor triggers only after its own wait (mode 1, not EARLY)
may load before its wait what the kernel before that predecessor wrote, since it cannot launch
until every program of its predecessor has seen that kernel finish (moe's routing GEMM2 reads the
router logits so).

MODE (A/B switch, read per launch): 0 off; 1 a kernel lets its successor launch once its own
wait returned (its predecessor is done), so a kernel runs while only the next one loads its
weights; 2 at its start, so successors can queue several kernels ahead (each launches only when
every program of its predecessor is resident, so the oldest kernel always runs). EARLY names
the kernels that trigger at their start under mode 1. Batch-1 decode graph on an H200
(bench/ab_decode.py), step time against no PDL (2,777 us at 512 context, 3,700 at 32k): mode 2
for every kernel +110 / +112 us (queued programs hold SM slots the running kernel needs); mode 1
-130 / -172 us; mode 1 with these EARLY -387 / -311 us (the norm before qkv; q/k-norm,
attention and the merge before o_proj; GEMM2 before the next layer's norm), so each projection
streams its weights while the small kernels before it run (without GEMM2: -316 / -334 us).
Batch 8: -130 to -167 us. Full bench (the server's own graphs): 355.9 -> 384.1 tok/s at 512.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None

MODE = 1
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter has no griddepcontrol
EARLY: frozenset[str] = frozenset({"add_rms_norm", "qk_norm", "decode", "merge", "gemm2"})
# Kernels launched without PDL (A/B switch: a normal launch after its predecessor has finished).
# Batch-1 graph at 512 context (H200, ninth session), against all on: GEMM2 off +187 us, GEMM1 off
# +95 us, the norm + router off +5 us, GEMM2 triggering after its wait (not in EARLY) +62 us.
OFF: frozenset[str] = frozenset()
_capable: dict[int, bool] = {}


def pdl_mode(device: torch.device) -> int:
    """The PDL mode for kernels launched on `device`: MODE on a Hopper-or-later GPU, else 0."""
    if MODE == 0 or device.type != "cuda" or gdc_wait is None or _INTERPRETED:
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capable:
        _capable[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return MODE if _capable[index] else 0


def pdl_launch(device: torch.device, kernel: str) -> dict[str, int | bool]:
    """Keyword arguments for launching `kernel` (a name EARLY may hold): PDL_MODE (the kernel's
    constexpr) and, only when PDL is on, launch_pdl (Triton before 3.4 rejects the option)."""
    mode = pdl_mode(device)
    if mode == 0 or kernel in OFF:
        return {"PDL_MODE": 0}
    return {"PDL_MODE": 2 if kernel in EARLY else mode, "launch_pdl": True}


@triton.jit
def pdl_start(PDL_MODE: tl.constexpr):
    """At a kernel's first line: in mode 2 its successor may launch now."""
    if PDL_MODE == 2:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL_MODE: tl.constexpr):
    """Before the first load of anything an earlier kernel wrote, and before any store."""
    if PDL_MODE > 0:
        gdc_wait()
    if PDL_MODE == 1:
        gdc_launch_dependents()


@triton.jit
def _prime_kernel(anchor_ptr, PDL_MODE: tl.constexpr):
    # It touches no memory, but waits on its predecessor anyway, so its end implies the
    # predecessor's end and flushed stores for the graph launched after it.
    pdl_wait(PDL_MODE)


def prime_pdl(anchor: torch.Tensor) -> None:
    """Launch an empty kernel with the PDL attribute, outside any graph, before a decode graph replays.
    `anchor` is any tensor on the graph's device (the kernel reads nothing).

    Measured on an H200 (bench/graph_capture_order.py): after a prefill's eager kernels,
    the decode graph's PDL overlap is partly lost (batch-1 step 2,581 us instead of 2,370) until some
    kernel is launched eagerly with the PDL attribute; replaying the graph does not restore it, and
    torch or Triton launches without the attribute neither break nor restore it. One empty launch
    (a few microseconds) before each replay keeps every step on the fast side.
    """
    if pdl_mode(anchor.device) != 0:
        _prime_kernel[(1,)](anchor, PDL_MODE=1, launch_pdl=True)
