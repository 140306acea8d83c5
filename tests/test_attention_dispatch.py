"""Which prefill chunks the GPU path sends to cuDNN and which stay on the Triton kernel.

The rule reads only host-side lengths, so it is checked here without a GPU; the attention itself is
checked against the torch reference in tests/gpu/test_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from qwenserve.kernels import attention, cudnn_attention  # noqa: E402
from qwenserve.model.ops import AttentionMetadata  # noqa: E402


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
    monkeypatch.setattr(cudnn_attention, "_disabled", True)  # qwenserve bench --no-cudnn-attention
    assert attention._long_chunks(_meta(*long_step), _q(8192)) == []
