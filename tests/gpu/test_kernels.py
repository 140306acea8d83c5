"""Triton kernels against the torch reference ops (float32 oracle, bf16 tolerances).

Run on the device with `python3 -m pytest -q tests/gpu`; skipped on machines without CUDA,
and importable without Triton.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
triton = pytest.importorskip("triton")

from qwenserve.kernels import kernel_ops  # noqa: E402
from qwenserve.kernels import moe as moe_module  # noqa: E402
from qwenserve.kernels.attention import (  # noqa: E402
    paged_attention,
    paged_decode_attention,
    paged_prefill_attention,
)
from qwenserve.kernels.kv_cache import write_kv_cache  # noqa: E402
from qwenserve.kernels.moe import fused_moe, fused_moe_grouped_mm, fused_moe_triton, moe_align  # noqa: E402
from qwenserve.kernels.norm import rms_norm  # noqa: E402
from qwenserve.model import ops  # noqa: E402
from qwenserve.model.ops import AttentionMetadata  # noqa: E402

DEV = "cuda"
BF16_TOL = 1.5e-2  # relative L2 error of bf16 outputs against a float32 oracle


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_step(
    q_lens: list[int],
    ctx_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int = 16,
    spare_blocks: int = 8,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random q and caches with every sequence's blocks scattered over the pool (block 0 unused)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(c + block_size - 1) // block_size for c in ctx_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks + 1
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    width = max(blocks_per_seq) + 3  # extra zero padding columns, as the runner pads
    tables = torch.zeros(len(ctx_lens), width, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = torch.tensor(perm[used : used + n], dtype=torch.int32)
        used += n
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    num_tokens = int(qsl[-1])
    slots = []
    for b, (ql, cl) in enumerate(zip(q_lens, ctx_lens, strict=True)):
        for p in range(cl - ql, cl):
            slots.append(int(tables[b, p // block_size]) * block_size + p % block_size)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEV),
        block_tables=tables.to(DEV),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=DEV),
        query_start_loc=qsl.to(DEV),
        max_query_len=max(q_lens),
        max_context_len=max(ctx_lens),
        is_decode_only=all(q == 1 for q in q_lens),
    )
    torch.manual_seed(seed)
    q = torch.randn(num_tokens, num_heads, head_dim, device=DEV, dtype=torch.bfloat16)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device=DEV, dtype=torch.bfloat16)
    v_cache = torch.randn(shape, device=DEV, dtype=torch.bfloat16)
    return q, k_cache, v_cache, meta


def reference_attention(q, k_cache, v_cache, meta, scale):
    return ops.paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, scale)


# ---------------------------------------------------------------------------- KV write


@pytest.mark.parametrize("num_tokens,num_kv_heads,head_dim", [(37, 4, 128), (5, 1, 16), (9, 3, 64)])
def test_write_kv_cache(num_tokens: int, num_kv_heads: int, head_dim: int) -> None:
    num_heads = num_kv_heads * 2
    # k, v as strided views of a fused qkv projection, as the model produces them.
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=DEV, dtype=torch.bfloat16)
    _, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    shape = (num_tokens // 16 + 8, 16, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device=DEV, dtype=torch.bfloat16)
    v_cache = torch.randn(shape, device=DEV, dtype=torch.bfloat16)
    slots = torch.randperm(shape[0] * 16 - 16, device=DEV)[:num_tokens] + 16
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ops.write_kv_cache(k, v, ref_k, ref_v, slots)
    write_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)

    # Slot -1 is skipped; slot 0 (graph padding) lands in block 0 only.
    slots2 = slots.clone()
    slots2[0] = -1
    slots2[1] = 0
    before = k_cache.clone()
    write_kv_cache(k, v, k_cache, v_cache, slots2)
    flat = k_cache.view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat[slots[0]], before.view(-1, num_kv_heads, head_dim)[slots[0]])
    assert torch.equal(flat[0], k[1])


# ---------------------------------------------------------------------------- decode

DECODE_CASES = [
    # (num_heads, num_kv_heads, head_dim, context lens)
    (32, 4, 128, [1, 17, 512, 1000, 8191, 32768]),
    (32, 4, 128, [512]),
    (32, 4, 128, [7] * 40 + [3000] * 24),
    (32, 4, 128, [131072, 262144, 100]),  # Qwen3-Coder's native context (262,144) in one sequence
    (4, 1, 16, [1, 5, 33, 200]),
    (8, 4, 32, [16, 15, 100]),
    (2, 2, 64, [70, 1]),
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,ctx_lens", DECODE_CASES)
def test_decode_attention(num_heads: int, num_kv_heads: int, head_dim: int, ctx_lens: list[int]) -> None:
    q, k_cache, v_cache, meta = make_step([1] * len(ctx_lens), ctx_lens, num_heads, num_kv_heads, head_dim)
    scale = head_dim**-0.5
    ref = reference_attention(q, k_cache, v_cache, meta, scale)
    out = paged_attention(q, k_cache, v_cache, meta, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert rel_err(out, ref) < BF16_TOL
    for splits in (1, 4, 64):
        out = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, splits)
        assert rel_err(out, ref) < BF16_TOL, splits


def test_decode_padding_rows_are_safe() -> None:
    """CUDA-graph padding rows (context 0 or 1, block table of zeros) give finite output."""
    q, k_cache, v_cache, meta = make_step([1, 1, 1], [40, 300, 9], 32, 4, 128)
    meta.context_lens[1] = 0
    meta.block_tables[1].zero_()
    meta.context_lens[2] = 1
    meta.block_tables[2].zero_()
    for splits in (1, 8):
        out = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, 0.1, splits)
        assert torch.isfinite(out).all()
        assert out[1].abs().max() == 0
        torch.testing.assert_close(out[2], v_cache[0, 0].repeat_interleave(8, 0))  # the one key is slot 0
    ref = reference_attention(q[:1], k_cache, v_cache, _sub_meta(meta, [0]), 0.1)
    assert rel_err(out[:1], ref) < BF16_TOL


def _sub_meta(meta: AttentionMetadata, rows: list[int]) -> AttentionMetadata:
    n = len(rows)
    return AttentionMetadata(
        slot_mapping=meta.slot_mapping[rows],
        block_tables=meta.block_tables[rows],
        context_lens=meta.context_lens[rows],
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=DEV),
        max_query_len=1,
        max_context_len=int(meta.context_lens[rows].max()),
        is_decode_only=True,
    )


def test_decode_cuda_graph_replay() -> None:
    """Captured once, replayed after the context lengths and block tables changed on the device."""
    q, k_cache, v_cache, meta = make_step([1] * 4, [4000, 2000, 700, 33], 32, 4, 128)
    scale = 128**-0.5
    paged_attention(q, k_cache, v_cache, meta, scale)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = paged_attention(q, k_cache, v_cache, meta, scale)
    num_blocks, width = k_cache.shape[0], meta.block_tables.shape[1]
    for ctx in ([100, 2000, 5, 700], [4000, 1, 33, 2500], [16, 17, 0, 3999]):
        meta.block_tables.copy_(torch.randint(1, num_blocks, (4, width), dtype=torch.int32, device=DEV))
        meta.context_lens.copy_(torch.tensor(ctx, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        live = [i for i, c in enumerate(ctx) if c > 0]
        ref = reference_attention(q[live], k_cache, v_cache, _sub_meta(meta, live), scale)
        assert rel_err(static_out[live], ref) < BF16_TOL
        assert torch.isfinite(static_out).all()


# ---------------------------------------------------------------------------- prefill

PREFILL_CASES = [
    # (num_heads, num_kv_heads, head_dim, query lens, context lens)
    (32, 4, 128, [2048], [2048]),  # cold prompt
    (32, 4, 128, [857], [16384 + 857]),  # follow-up turn over a cached prefix
    (32, 4, 128, [1, 300, 1, 77, 1], [1000, 300, 5, 2100, 32768]),  # mixed prefill + decode
    (32, 4, 128, [256, 1], [262144, 131073]),  # a chunk at the end of the native context, beside a decode
    (32, 4, 128, [129, 1, 16], [129, 64, 50]),
    (4, 1, 16, [5, 1, 20, 3], [5, 40, 50, 3]),
    (8, 4, 32, [33, 1], [100, 17]),
    (6, 2, 64, [17, 40], [17, 90]),  # group 3: rows not a power of two per token
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,q_lens,ctx_lens", PREFILL_CASES)
def test_prefill_attention(
    num_heads: int, num_kv_heads: int, head_dim: int, q_lens: list[int], ctx_lens: list[int]
) -> None:
    q, k_cache, v_cache, meta = make_step(q_lens, ctx_lens, num_heads, num_kv_heads, head_dim)
    scale = head_dim**-0.5
    ref = reference_attention(q, k_cache, v_cache, meta, scale)
    out = paged_attention(q, k_cache, v_cache, meta, scale)
    assert out.shape == q.shape
    assert rel_err(out, ref) < BF16_TOL
    for block_m, block_n in ((16, 16), (64, 32)):
        out = paged_prefill_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.context_lens,
            meta.query_start_loc,
            scale,
            block_m,
            block_n,
        )
        assert rel_err(out, ref) < BF16_TOL
    tables = (q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.query_start_loc, scale)
    for splits in (2, 8):  # keys shared between programs, merged by log-sum-exp (prefill_num_splits)
        assert rel_err(paged_prefill_attention(*tables, num_splits=splits), ref) < BF16_TOL


# Long chunks go to cuDNN when the host lengths are known (as the engine packs them); the rest of the step
# stays on Triton. Most cases lower the thresholds (min query, min query-key pairs) so short chunks take it too.
DENSE_CASES = [
    # (num_heads, num_kv_heads, head_dim, query lens, context lens, thresholds)
    (32, 4, 128, [2048], [2048], (128, 0)),  # cold chunk: the causal square alone
    (32, 4, 128, [857], [16384 + 857], (128, 0)),  # follow-up turn over a cached prefix
    # long and short chunks beside decodes: 600 over 1,000 goes to cuDNN, 700 and 77 cold stay on Triton
    (32, 4, 128, [600, 1, 77, 1, 700], [1600, 33, 77, 5000, 700], (64, 500_000)),
    (32, 4, 128, [1024], [131072 + 1024], None),  # a chunk at 128k, the engine's own thresholds
    (16, 16, 64, [130, 200], [130, 1000], (100, 0)),  # no GQA, head_dim 64
    (8, 2, 128, [100], [100 + 5], (100, 0)),  # prefix shorter than a block
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,q_lens,ctx_lens,thresholds", DENSE_CASES)
def test_long_chunks_take_cudnn(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_lens: list[int],
    ctx_lens: list[int],
    thresholds: tuple[int, int] | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qwenserve.kernels import attention, cudnn_attention

    if thresholds is not None:
        monkeypatch.setattr(attention, "DENSE_PREFILL_MIN_QUERY", thresholds[0])
        monkeypatch.setattr(attention, "DENSE_PREFILL_MIN_PAIRS", thresholds[1])
    monkeypatch.setattr(cudnn_attention, "_disabled", False)  # whatever QWENSERVE_CUDNN_PREFILL says
    dense = [attention.is_dense_chunk(n, c) for n, c in zip(q_lens, ctx_lens, strict=True)]
    assert any(dense)
    q, k_cache, v_cache, meta = make_step(q_lens, ctx_lens, num_heads, num_kv_heads, head_dim)
    meta.host_query_start_loc = meta.query_start_loc.tolist()
    meta.host_context_lens = list(ctx_lens)
    scale = head_dim**-0.5
    ref = reference_attention(q, k_cache, v_cache, meta, scale)
    calls = []
    chunk_attention = cudnn_attention.chunk_attention
    monkeypatch.setattr(cudnn_attention, "chunk_attention", lambda q, *a: calls.append(q.shape[0]) or chunk_attention(q, *a))
    out = paged_attention(q, k_cache, v_cache, meta, scale)
    assert cudnn_attention.usable(head_dim, torch.bfloat16) is True
    assert calls == [n for n, d in zip(q_lens, dense, strict=True) if d]
    assert rel_err(out, ref) < BF16_TOL
    starts = meta.host_query_start_loc
    for i in range(len(q_lens)):  # each sequence on its own, whichever backend took it
        rows = slice(starts[i], starts[i + 1])
        assert rel_err(out[rows], ref[rows]) < BF16_TOL, f"sequence {i}"


@pytest.mark.parametrize("error", [RuntimeError("cuDNN SDPA not supported here"), TypeError("another signature")])
def test_cudnn_failure_falls_back_to_triton(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """A cuDNN that cannot run (first use: no cuDNN attention here, or an older torch whose op has another
    signature) leaves every chunk to Triton, with the same result."""
    from qwenserve.kernels import attention, cudnn_attention

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(cudnn_attention, "_disabled", False)  # whatever QWENSERVE_CUDNN_PREFILL says
    monkeypatch.setattr(cudnn_attention, "_cudnn_attention", broken)
    monkeypatch.setattr(cudnn_attention, "_usable", {})
    monkeypatch.setattr(attention, "DENSE_PREFILL_MIN_PAIRS", 0)
    q, k_cache, v_cache, meta = make_step([600, 1], [1000, 40], 32, 4, 128)
    meta.host_query_start_loc = meta.query_start_loc.tolist()
    meta.host_context_lens = [1000, 40]
    scale = 128**-0.5
    out = paged_attention(q, k_cache, v_cache, meta, scale)
    assert cudnn_attention.usable(128, torch.bfloat16) is False
    assert rel_err(out, reference_attention(q, k_cache, v_cache, meta, scale)) < BF16_TOL
    out = paged_attention(q, k_cache, v_cache, meta, scale)  # no second try
    assert rel_err(out, reference_attention(q, k_cache, v_cache, meta, scale)) < BF16_TOL



def test_cudnn_out_of_memory_falls_back_to_triton_for_that_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """A context whose contiguous copy does not fit: the step is redone on Triton, the other layers of the step
    and later contexts as long do not try again, shorter ones still go to cuDNN."""
    from qwenserve.kernels import attention, cudnn_attention

    chunk_attention = cudnn_attention.chunk_attention
    calls: list[int] = []

    def short_of_memory(q, k_cache, v_cache, block_table, context_len, scale):
        calls.append(context_len)
        if context_len >= 1000:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return chunk_attention(q, k_cache, v_cache, block_table, context_len, scale)

    monkeypatch.setattr(cudnn_attention, "_disabled", False)  # whatever QWENSERVE_CUDNN_PREFILL says
    monkeypatch.setattr(cudnn_attention, "chunk_attention", short_of_memory)
    monkeypatch.setattr(cudnn_attention, "_out_of_memory_context", None)
    monkeypatch.setattr(attention, "DENSE_PREFILL_MIN_PAIRS", 0)
    scale = 128**-0.5
    q, k_cache, v_cache, meta = make_step([600, 1], [1000, 40], 32, 4, 128)
    meta.host_query_start_loc, meta.host_context_lens = meta.query_start_loc.tolist(), [1000, 40]
    for _ in range(2):  # two layers of one step
        out = paged_attention(q, k_cache, v_cache, meta, scale)
        assert rel_err(out, reference_attention(q, k_cache, v_cache, meta, scale)) < BF16_TOL
    assert calls == [1000] and cudnn_attention._out_of_memory_context == 1000
    q, k_cache, v_cache, meta = make_step([600], [900], 32, 4, 128)
    meta.host_query_start_loc, meta.host_context_lens = meta.query_start_loc.tolist(), [900]
    out = paged_attention(q, k_cache, v_cache, meta, scale)
    assert calls == [1000, 900]
    assert rel_err(out, reference_attention(q, k_cache, v_cache, meta, scale)) < BF16_TOL


def test_write_then_attend_matches_reference_pipeline() -> None:
    """KV write + attention together, as the model calls them, against the reference pair."""
    q, k_cache, v_cache, meta = make_step([300, 1, 40], [300, 900, 1040], 32, 4, 128)
    t = q.shape[0]
    k = torch.randn(t, 4, 128, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(t, 4, 128, device=DEV, dtype=torch.bfloat16)
    ref_k, ref_v = k_cache.float(), v_cache.float()
    ops.write_kv_cache(k, v, ref_k, ref_v, meta.slot_mapping)
    ref = ops.paged_attention(q.float(), ref_k, ref_v, meta, 0.088)
    write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
    out = paged_attention(q, k_cache, v_cache, meta, 0.088)
    assert rel_err(out, ref) < BF16_TOL


# ---------------------------------------------------------------------------- MoE


@pytest.fixture(scope="module")
def qwen_experts() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    e, inter, hidden = 128, 768, 2048
    w13 = torch.randn(e, 2 * inter, hidden, device=DEV, dtype=torch.bfloat16) * hidden**-0.5
    w2 = torch.randn(e, hidden, inter, device=DEV, dtype=torch.bfloat16) * inter**-0.5
    return w13, w2


def routing(
    num_tokens: int, num_experts: int, top_k: int, skew: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(num_tokens, num_experts, device=DEV)
    if skew:  # most tokens pick the same few experts: long runs and many empty experts
        logits[:, :3] += 10
    weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def moe_reference(x, w13, w2, weights, ids):
    return ops.fused_moe(x.float(), w13.float(), w2.float(), weights.float(), ids)


@pytest.mark.parametrize("num_tokens", [1, 3, 8, 64, 257, 512, 2048, 8192])
def test_fused_moe_qwen_shape(qwen_experts, num_tokens: int) -> None:
    w13, w2 = qwen_experts
    x = torch.randn(num_tokens, 2048, device=DEV, dtype=torch.bfloat16)
    weights, ids = routing(num_tokens, 128, 8)
    ref = moe_reference(x, w13, w2, weights, ids)
    out = fused_moe(x, w13, w2, weights, ids)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert rel_err(out, ref) < BF16_TOL
    # The routing weights as the model passes them (rounded to bf16).
    out_bf16w = fused_moe_triton(x, w13, w2, weights.to(torch.bfloat16), ids)
    assert rel_err(out_bf16w, ref) < BF16_TOL
    if num_tokens >= 64:
        assert rel_err(fused_moe_grouped_mm(x, w13, w2, weights, ids), ref) < BF16_TOL


@pytest.mark.parametrize(
    "num_tokens,num_experts,inter,hidden,top_k,skew",
    [
        (1, 8, 32, 64, 2, False),
        (40, 16, 48, 32, 4, False),
        (300, 8, 64, 128, 2, True),
        (2000, 128, 768, 2048, 8, True),
    ],
)
def test_fused_moe_small_and_skewed(
    num_tokens: int, num_experts: int, inter: int, hidden: int, top_k: int, skew: bool
) -> None:
    torch.manual_seed(num_tokens)
    w13 = torch.randn(num_experts, 2 * inter, hidden, device=DEV, dtype=torch.bfloat16) * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inter, device=DEV, dtype=torch.bfloat16) * inter**-0.5
    x = torch.randn(num_tokens, hidden, device=DEV, dtype=torch.bfloat16)
    weights, ids = routing(num_tokens, num_experts, top_k, skew)
    ref = moe_reference(x, w13, w2, weights, ids)
    assert rel_err(fused_moe(x, w13, w2, weights, ids), ref) < BF16_TOL


@pytest.mark.parametrize("num_pairs", [8, 4096, 20000])
@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("torch_path", [False, True])
def test_moe_align_contract(num_pairs: int, block_m: int, torch_path: bool, monkeypatch) -> None:
    if torch_path:
        monkeypatch.setattr(moe_module, "ALIGN_TRITON_MAX_PAIRS", 0)
    ids = torch.randint(0, 128, (num_pairs // 8, 8), device=DEV, dtype=torch.int32)
    sorted_ids, expert_ids, num_rows = moe_align(ids, 128, block_m)
    n = int(num_rows)
    flat = ids.reshape(-1)
    counts = torch.bincount(flat.long(), minlength=128)
    assert n == int(((counts + block_m - 1) // block_m * block_m).sum())
    rows = sorted_ids[:n].long()
    real = rows < flat.numel()
    assert int(real.sum()) == flat.numel()
    assert torch.equal(torch.sort(rows[real]).values, torch.arange(flat.numel(), device=DEV))
    row_expert = expert_ids[: n // block_m].long().repeat_interleave(block_m)
    assert torch.equal(flat[rows[real]].long(), row_expert[real])


def test_fused_moe_cuda_graph(qwen_experts) -> None:
    w13, w2 = qwen_experts
    x = torch.randn(8, 2048, device=DEV, dtype=torch.bfloat16)
    weights, ids = routing(8, 128, 8)
    fused_moe(x, w13, w2, weights, ids)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        w_new, ids_new = routing(8, 128, 8)
        weights.copy_(w_new)
        ids.copy_(ids_new)
        graph.replay()
        assert rel_err(out, moe_reference(x, w13, w2, weights, ids)) < BF16_TOL


# ---------------------------------------------------------------------------- norm and wiring


@pytest.mark.parametrize("shape", [(7, 2048), (5, 32, 128), (3, 4, 128), (1, 64)])
def test_rms_norm(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, device=DEV, dtype=torch.bfloat16) * 3
    w = torch.randn(shape[-1], device=DEV, dtype=torch.bfloat16)
    out = rms_norm(x, w, 1e-6)
    ref = ops.rms_norm(x, w, 1e-6)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1.6e-2, atol=1e-2)


def test_kernel_ops_has_the_ops_names() -> None:
    from dataclasses import fields

    from qwenserve.model.qwen3 import Ops

    # Every op but Ops.linear (projections stay on cuBLAS).
    assert set(kernel_ops()) == {f.name for f in fields(Ops)} - {"linear"}
