"""The benchmark's physical limits agree with the hand arithmetic in shared/reference/performance.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenserve.bench import decode_step_bytes, expected_experts_touched, prefill_flops
from qwenserve.model.loader import load_model_config

FIXTURE = Path(__file__).parent / "fixtures" / "qwen3-coder-30b-a3b-instruct"


@pytest.fixture(scope="module")
def cfg():
    return load_model_config(FIXTURE)


def test_batch1_decode_reads_about_6_gb(cfg) -> None:
    # performance.md: 6.084 GB per token at batch 1 (active weights + lm_head), 551 tok/s on H100.
    assert decode_step_bytes(cfg, 1, 0) == pytest.approx(6.084e9, rel=0.01)
    assert 3.35e12 / decode_step_bytes(cfg, 1, 0) == pytest.approx(551, rel=0.01)
    # 32k context adds 32768 * 96 KiB of KV reads: ~360 tok/s on H100.
    assert 3.35e12 / decode_step_bytes(cfg, 1, 32768) == pytest.approx(360, rel=0.01)


def test_expert_union_grows_with_batch(cfg) -> None:
    assert expected_experts_touched(cfg, 1) == pytest.approx(8)
    assert expected_experts_touched(cfg, 8) == pytest.approx(51.6, abs=0.1)
    assert expected_experts_touched(cfg, 64) == pytest.approx(125.9, abs=0.1)


def test_prefill_flops_match_the_roofline_table(cfg) -> None:
    # performance.md R5: 2k tokens ~13 ms and 32k ~608 ms at 989 TFLOP/s.
    assert prefill_flops(cfg, 2048) / 989e12 == pytest.approx(0.013, rel=0.15)
    assert prefill_flops(cfg, 32768) / 989e12 == pytest.approx(0.608, rel=0.15)


def test_bench_samples_as_qwen_code_is_served() -> None:
    from qwenserve.bench import model_sampling

    # qwen-code sends no sampling fields, so it gets generation_config.json's.
    want = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "seed": 0}
    assert model_sampling(FIXTURE) == want


def test_bench_table_names_a_memory_cap() -> None:
    from qwenserve.bench import memory_of

    assert memory_of({"gpu_total_gib": 139.8}) == "139.8"
    assert memory_of({"gpu_total_gib": 139.8, "memory_cap_gib": 79.2}) == "79.2 (capped: the GPU has 139.8)"
