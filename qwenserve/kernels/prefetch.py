"""L2 prefetch of the next weights while the GPU's memory bus is idle.

At batch 1 a decode step alternates between weight streaming (the projections and the experts,
bound by HBM bandwidth) and latency-bound kernels that barely touch memory (norms, RoPE,
attention over a short context, routing). A kernel of the second kind can start pulling the
weights of the streaming kernel after it into L2 with Hopper's bulk prefetch
(`cp.async.bulk.prefetch.L2`: one instruction per contiguous chunk, no registers, no waiting),
so those weights arrive while the bus would otherwise sit idle.

`prefetch_args(tensor)` gives a kernel the (bytes, byte count) it passes to `prefetch_l2`,
which it calls only under a PREFETCH constexpr (older GPUs never compile the instruction). Prefetch is a hint: disabled (numel 0) on GPUs before sm_90, under the
Triton interpreter, and for tensors whose bytes are not 16-byte aligned.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# A/B switches (bench/ab_decode.py): which weights are prefetched, and by whom.
PREFETCH_QKV = True  # the input add + RMSNorm prefetches the layer's qkv projection
PREFETCH_O_PROJ = True  # q/k-norm + RoPE prefetches the o_proj weight, read after attention
# The routing program prefetches the chosen experts' down projections (w2) while GEMM1 streams
# the gate/up weights: 0 off, 1 on, 2 on with an evict-last L2 policy.
PREFETCH_W2 = 0

_capable: dict[int, bool] = {}


def prefetch_supported(device: torch.device) -> bool:
    """Bulk L2 prefetch exists from sm_90 (Hopper); the Triton interpreter has no inline PTX."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capable:
        _capable[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _capable[index]


def prefetch_args(tensor: torch.Tensor | None, enabled: bool = True) -> tuple[torch.Tensor | None, int]:
    """(the tensor's bytes as a flat uint8 view, their count) for a kernel's prefetch arguments, or
    (None, 0): no prefetch (switched off, no Hopper, not contiguous or not 16-byte aligned)."""
    if tensor is None or not enabled or not tensor.is_contiguous() or not prefetch_supported(tensor.device):
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
