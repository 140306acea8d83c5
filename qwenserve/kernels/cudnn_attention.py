"""Long prefill chunks through cuDNN's fused attention (torch's SDPA cuDNN backend).

On Hopper cuDNN's flash attention runs at 1.6-1.9x the FLOP rate of our Triton prefill kernel
(556-611 against 329-385 TFLOP/s for 8k-token chunks over 8k-128k contexts, H200,
bench/tune_prefill_attn.py), which is most of a long cold prompt's time. cuDNN wants contiguous K/V
and aligns a causal mask top-left, so one sequence's chunk is done as:
  1. gather its whole context from the paged cache into contiguous [ctx, kv_heads, head_dim] K and V
     (one index_select per tensor: 128 MiB each at 128k tokens, against ~50 ms of attention per layer);
  2. attend the chunk to the prefix before it with no mask, and to itself with the causal mask
     (top-left is right for a square);
  3. merge the two partial results through their log-sum-exps.
A chunk with no prefix is step 2 alone. The caller keeps short chunks and decode rows on Triton.

On unless QWENSERVE_CUDNN_PREFILL=0. Long cold prompts gain most (128k: 21 -> 13 s). It was opt-in for a
while: after the first cuDNN prefill of a process every penalised sampled decode step (the model's default
sampling, what qwen-code gets) ran ~8% slower on the H200, 411 -> 380 tok/s at batch 1. Those steps launched
four eager kernels after their sampler graph to record the sampled tokens in the penalty rows; recorded
inside the graph instead (engine/sampler_graphs.py), they run at 415 tok/s before and after
(bench/after_cudnn.py, docs/BENCHMARKS.md). Why the eager kernels slowed only after cuDNN is not known.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

# (head_dim, dtype) -> whether cuDNN's attention ran here; probed at the first long chunk of each shape.
_usable: dict[tuple[int, torch.dtype], bool] = {}
_disabled = os.environ.get("QWENSERVE_CUDNN_PREFILL", "1") == "0"
# torch keeps every cuDNN graph it builds (per thread, no eviction), two per chunk shape; a server up for days
# would keep adding them, so past this many shapes new ones stay on Triton (known ones still come here).
MAX_SHAPES = 256
_shapes: set[tuple[int, int, int, int, torch.dtype]] = set()
# The shortest context whose contiguous copy ran out of memory: no longer context is tried again.
_out_of_memory_context: int | None = None


def set_enabled(enabled: bool) -> None:
    """Send long chunks here or keep every chunk on the Triton kernel (`qwenserve bench --cudnn-attention`
    weighs the two)."""
    global _disabled
    _disabled = not enabled


def _cudnn_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [1, H, L, D], natural-log LSE [1, H, L]) for q [1, H, L, D] over k / v [1, KVH, S, D]; cuDNN
    maps each group of H / KVH query heads onto its KV head itself (GQA), so K/V are never repeated."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)[
        :2
    ]
    return out, lse.reshape(q.shape[:3])


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """One sequence's first context_len cache rows as contiguous [1, kv_heads, context_len, head_dim]."""
    block_size = cache.shape[1]
    blocks = block_table[: -(-context_len // block_size)]
    rows = cache.index_select(0, blocks).flatten(0, 1)[:context_len]
    return rows.transpose(0, 1).unsqueeze(0)


def chunk_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of one sequence's chunk q [L, H, D] (its last L context positions) over its
    paged context; the cache must already hold the chunk's keys. Returns [L, H, D] in q's dtype."""
    q_len = q.shape[0]
    prefix = context_len - q_len
    k = _gather_context(k_cache, block_table, context_len)
    v = _gather_context(v_cache, block_table, context_len)
    qt = q.transpose(0, 1).unsqueeze(0)
    own, own_lse = _cudnn_attention(qt, k[:, :, prefix:], v[:, :, prefix:], True, scale)
    if prefix == 0:
        return own[0].transpose(0, 1)
    past, past_lse = _cudnn_attention(qt, k[:, :, :prefix], v[:, :, :prefix], False, scale)
    # softmax over both parts = each part's softmax weighted by its share of the total exp-sum
    own_share = torch.sigmoid(own_lse - past_lse)[..., None]
    merged = past.float().lerp_(own.float(), own_share)
    return merged[0].transpose(0, 1).to(q.dtype)


def usable(head_dim: int, dtype: torch.dtype) -> bool | None:
    """Whether cuDNN attention works for this shape: True / False once probed, None before."""
    if _disabled or dtype not in (torch.bfloat16, torch.float16) or head_dim % 8 or head_dim > 128:
        return False
    return _usable.get((head_dim, dtype))


def record_probe(head_dim: int, dtype: torch.dtype, error: Exception | None) -> None:
    """Remember how the first cuDNN attention of this shape went; a failure is logged once."""
    _usable[head_dim, dtype] = error is None
    if error is not None:
        logger.warning("cuDNN attention is unavailable (%s); long prefills stay on the Triton kernel", error)


def admits(q_len: int, context_len: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether a chunk of this shape may come here: its context is shorter than one that ran out of memory,
    and its shape is known or there is room for one more (MAX_SHAPES)."""
    if _out_of_memory_context is not None and context_len >= _out_of_memory_context:
        return False
    shape = (q_len, context_len, num_heads, head_dim, dtype)
    if shape not in _shapes and len(_shapes) >= MAX_SHAPES:
        return False
    _shapes.add(shape)
    return True


def record_out_of_memory(context_len: int) -> None:
    """Remember that a context this long did not fit as a contiguous copy (logged the first time)."""
    global _out_of_memory_context
    if _out_of_memory_context is None:
        logger.warning(
            "no GPU memory for a contiguous copy of a %d-token context: chunks with contexts this long use the "
            "slower Triton attention (a lower --gpu-memory-utilization leaves room)", context_len
        )
    _out_of_memory_context = min(context_len, _out_of_memory_context or context_len)
