"""Which prefill chunks the GPU path sends to cuDNN and which stay on the Triton kernel, and how a chunk
is assembled for cuDNN (context gathered from the paged cache, prefix and chunk attended apart, merged by
log-sum-exp).

Both read only host-side lengths and torch ops, so they are checked here without a GPU, the cuDNN call
itself replaced by a float32 stand-in; tests/gpu/test_kernels.py runs the real one against the reference.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qwenserve.kernels import attention, cudnn_attention  # noqa: E402
from qwenserve.model.ops import AttentionMetadata  # noqa: E402


@pytest.fixture(autouse=True)
def cudnn_prefill_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule as it runs by default, whatever QWENSERVE_CUDNN_PREFILL the test run has."""
    monkeypatch.setattr(cudnn_attention, "_disabled", False)


def _meta(query_lens: list[int], context_lens: list[int], host: bool = True) -> AttentionMetadata:
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64),
        block_tables=torch.zeros(len(query_lens), 1, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        max_query_len=max(query_lens),
        max_context_len=max(context_lens),
        is_decode_only=max(query_lens) == 1,
        host_query_start_loc=starts if host else None,
        host_context_lens=list(context_lens) if host else None,
    )


def _q(num_tokens: int, head_dim: int = 128, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(num_tokens, 32, head_dim, dtype=dtype)


@pytest.mark.parametrize(
    "query_lens,context_lens,expected",
    [
        ([8192], [8192], []),  # a long prompt's first chunk: no prefix, too little to pay for a graph build
        ([8192], [16384], [(0, 0, 8192, 16384)]),  # its second chunk on
        ([8192], [131072], [(0, 0, 8192, 131072)]),
        ([859], [17499], []),  # a qwen-code follow-up turn over 16.6k cached tokens: Triton
        ([2048], [52048], [(0, 0, 2048, 52048)]),  # 2k new tokens of a 50k conversation
        ([100], [200000], []),  # too few queries however long the context
        # a mixed step: only the long chunk leaves; decode rows and short chunks stay on Triton
        ([1, 2048, 300, 1], [5000, 52048, 300, 90000], [(1, 1, 2049, 52048)]),
    ],
)
def test_long_chunks_by_work(
    query_lens: list[int], context_lens: list[int], expected: list[tuple[int, int, int, int]]
) -> None:
    meta = _meta(query_lens, context_lens)
    assert attention._long_chunks(meta, _q(sum(query_lens))) == expected
    for n, ctx in zip(query_lens, context_lens, strict=True):  # the kernel's skip rule names the same chunks
        assert attention.is_dense_chunk(n, ctx) == any(e[3] == ctx and e[2] - e[1] == n for e in expected)


def test_no_host_lengths_or_no_cudnn_keeps_everything_on_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    long_step = ([8192], [131072])
    assert attention._long_chunks(_meta(*long_step, host=False), _q(8192)) == []  # e.g. a decode graph's metadata
    assert attention._long_chunks(_meta(*long_step), _q(8192, dtype=torch.float32)) == []  # cuDNN: 16-bit only
    assert attention._long_chunks(_meta(*long_step), _q(8192, head_dim=256)) == []
    monkeypatch.setattr(cudnn_attention, "_usable", {(128, torch.bfloat16): False})  # probed and failed
    assert attention._long_chunks(_meta(*long_step), _q(8192)) == []
    monkeypatch.setattr(cudnn_attention, "_usable", {})
    monkeypatch.setattr(cudnn_attention, "_disabled", True)  # QWENSERVE_CUDNN_PREFILL=0, or qwenserve bench --no-cudnn-attention
    assert attention._long_chunks(_meta(*long_step), _q(8192)) == []


def test_cudnn_prefill_is_on_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """On by default; QWENSERVE_CUDNN_PREFILL=0 keeps every chunk on the Triton kernel."""
    import importlib

    for value, disabled in ((None, False), ("1", False), ("0", True)):
        if value is None:
            monkeypatch.delenv("QWENSERVE_CUDNN_PREFILL", raising=False)
        else:
            monkeypatch.setenv("QWENSERVE_CUDNN_PREFILL", value)
        assert importlib.reload(cudnn_attention)._disabled is disabled
    assert attention._long_chunks(_meta([8192], [131072]), _q(8192)) == []
    monkeypatch.delenv("QWENSERVE_CUDNN_PREFILL")
    assert importlib.reload(cudnn_attention)._disabled is False


def test_a_step_is_decided_once_and_all_or_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decided at the first layer and kept for the others; a chunk cuDNN may not take (a new shape past
    MAX_SHAPES, a context as long as one that ran out of memory) keeps the whole step on Triton, since the
    Triton kernel skips by the length rule alone."""
    monkeypatch.setattr(cudnn_attention, "_usable", {})
    monkeypatch.setattr(cudnn_attention, "_shapes", set())
    monkeypatch.setattr(cudnn_attention, "MAX_SHAPES", 2)
    two_long = ([8192, 2048], [131072, 52048])
    meta = _meta(*two_long)
    chunks = attention._long_chunks(meta, _q(10240))
    assert chunks == [(0, 0, 8192, 131072), (1, 8192, 10240, 52048)]
    assert attention._long_chunks(meta, _q(10240)) is chunks  # the other layers
    assert attention._long_chunks(_meta([4096], [60000]), _q(4096)) == []  # a third shape: no room
    assert attention._long_chunks(_meta(*two_long), _q(10240)) == chunks  # known shapes still go
    monkeypatch.setattr(cudnn_attention, "_out_of_memory_context", 100_000)
    assert attention._long_chunks(_meta(*two_long), _q(10240)) == []  # 131072 >= 100000: not even the other
    assert attention._long_chunks(_meta([2048], [52048]), _q(2048)) == [(0, 0, 2048, 52048)]


def test_out_of_memory_is_remembered_by_context_length(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cudnn_attention, "_out_of_memory_context", None)
    cudnn_attention.record_out_of_memory(200_000)
    cudnn_attention.record_out_of_memory(150_000)
    cudnn_attention.record_out_of_memory(180_000)
    assert cudnn_attention._out_of_memory_context == 150_000
    assert not cudnn_attention.admits(8192, 150_000, 32, 128, torch.bfloat16)
    assert cudnn_attention.admits(8192, 149_999, 32, 128, torch.bfloat16)


def _attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """What cudnn_attention._cudnn_attention returns, in float32 on the CPU: (out, natural-log LSE), GQA, and
    a causal mask aligned top-left as cuDNN aligns it."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    if causal:
        rows, cols = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(rows, cols, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v, scores.logsumexp(-1)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,query_lens,context_lens",
    [
        (8, 2, [40], [40]),  # no prefix: the causal square alone
        (8, 2, [40], [40 + 100]),  # a prefix of several blocks
        (8, 2, [33], [33 + 5]),  # a prefix shorter than a block
        (4, 4, [1, 21, 1], [50, 21 + 70, 9]),  # no GQA; the middle sequence of a mixed step
        (8, 1, [17], [17 + 16]),  # one KV head; a prefix of exactly one block
    ],
)
def test_chunk_attention_assembles_what_the_reference_computes(
    num_heads: int, num_kv_heads: int, query_lens: list[int], context_lens: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from qwenserve.model import ops

    monkeypatch.setattr(cudnn_attention, "_cudnn_attention", _attention_with_lse)
    gen = torch.Generator().manual_seed(0)
    block_size, head_dim = 16, 32
    blocks = [-(-c // block_size) for c in context_lens]
    order = (torch.randperm(sum(blocks) + 3, generator=gen) + 1).tolist()  # scattered over the pool
    tables = torch.zeros(len(blocks), max(blocks) + 2, dtype=torch.int32)
    for seq, n in enumerate(blocks):
        tables[seq, :n] = torch.tensor(order[sum(blocks[:seq]) : sum(blocks[: seq + 1])])
    shape = (sum(blocks) + 4, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    meta = _meta(query_lens, context_lens)
    meta.block_tables = tables
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen)
    scale = head_dim**-0.5
    ref = ops.paged_attention(q, k_cache, v_cache, meta, scale)
    starts = meta.host_query_start_loc
    for seq, context_len in enumerate(context_lens):
        rows = slice(starts[seq], starts[seq + 1])
        out = cudnn_attention.chunk_attention(q[rows], k_cache, v_cache, tables[seq], context_len, scale)
        torch.testing.assert_close(out, ref[rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "query_lens,context_lens,splits",
    [
        ([300], [40300], 8),  # a short tool result deep into a session: 76 programs, one wave 58 % full
        ([100], [20100], 4),  # 28 programs: 4 splits fill as many waves as 8
        ([600], [20600], 4),  # 152 programs: two waves, the second 15 % full
        ([1, 1], [4096, 3000], 4),  # decode rows alone: 8 programs, splits kept at >= 512 keys
        ([857], [16384 + 857], 1),  # qwen-code's follow-up turn: 216 programs, splitting gains too little
        ([857] + [1] * 31, [17241] + [20000] * 31, 1),  # the same beside 31 decoding sequences
        ([2048], [2048], 1),  # a cold prompt: four whole waves
        ([8192], [8192], 1),  # a cold 8k chunk: 2,052 programs
        ([40], [60], 1),  # too few keys to share
    ],
)
def test_prefill_splits_fill_idle_sms(query_lens: list[int], context_lens: list[int], splits: int) -> None:
    meta = _meta(query_lens, context_lens)
    q = torch.zeros(sum(query_lens), 32, 128)
    k_cache = torch.zeros(2, 16, 4, 128)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention, "_num_sms", lambda device: 132)
        assert attention._prefill_splits(q, k_cache, meta) == splits
        assert meta.prefill_splits == splits  # kept for the step's other layers
        no_host = _meta(query_lens, context_lens, host=False)
        assert attention._prefill_splits(q, k_cache, no_host) == 1
