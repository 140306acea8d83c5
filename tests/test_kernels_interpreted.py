"""The Triton attention kernels, prefill and decode, split and unsplit, run on the CPU through Triton's
interpreter (TRITON_INTERPRET=1, float32: the interpreter has no bfloat16) against the torch reference op.

The interpreter must be chosen before the kernels are decorated, so the check runs in a child process.
tests/gpu/test_kernels.py runs the compiled kernels on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CHECK = """
import torch
from qwenserve.kernels import attention
from qwenserve.model import ops
from qwenserve.model.ops import AttentionMetadata

torch.manual_seed(0)
heads, kv_heads, dim, block = 8, 2, 32, 16
query_lens, context_lens = [5, 1, 20], [70, 300, 20]  # a chunk over a prefix, a decode row, a cold chunk
widths = [-(-c // block) for c in context_lens]
k_cache = torch.randn(sum(widths) + 1, block, kv_heads, dim)
v_cache = torch.randn_like(k_cache)
order = torch.randperm(sum(widths)).to(torch.int32) + 1
tables = torch.zeros(len(widths), max(widths), dtype=torch.int32)
for i, w in enumerate(widths):
    tables[i, :w] = order[sum(widths[:i]) : sum(widths[: i + 1])]
starts = torch.tensor([0, 5, 6, 26], dtype=torch.int32)
q = torch.randn(26, heads, dim)
meta = AttentionMetadata(torch.zeros(26, dtype=torch.int64), tables, torch.tensor(context_lens, dtype=torch.int32),
                         starts, max(query_lens), max(context_lens), False)
ref = ops.paged_attention(q, k_cache, v_cache, meta, dim**-0.5)
for splits in (1, 4):
    out = attention.paged_prefill_attention(q, k_cache, v_cache, tables, meta.context_lens, starts, dim**-0.5, 32, 16,
                                            num_splits=splits)
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-5, ("prefill", splits, err)
decode = AttentionMetadata(torch.zeros(3, dtype=torch.int64), tables, meta.context_lens,
                           torch.arange(4, dtype=torch.int32), 1, max(context_lens), True)
q = torch.randn(3, heads, dim)
ref = ops.paged_attention(q, k_cache, v_cache, decode, dim**-0.5)
for splits in (1, 4):
    out = attention.paged_decode_attention(q, k_cache, v_cache, tables, meta.context_lens, dim**-0.5, splits)
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-5, ("decode", splits, err)
print("ok")
"""


def test_attention_kernels_split_and_unsplit_match_the_reference() -> None:
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
