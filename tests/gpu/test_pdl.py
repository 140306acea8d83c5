"""Programmatic dependent launch (kernels/pdl.py): kernels that start before their predecessor ends
must compute exactly what serialized launches compute (a missing wait shows up as a race)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs a Hopper-or-later GPU"
)

from qwenserve.config import EngineConfig  # noqa: E402
from qwenserve.engine.llm_engine import LLMEngine  # noqa: E402
from qwenserve.engine.sampling_params import SamplingParams  # noqa: E402


def test_pdl_is_on_for_hopper() -> None:
    from qwenserve.kernels import pdl

    assert pdl.pdl_mode(torch.device("cuda")) == pdl.MODE > 0
    assert pdl.pdl_launch(torch.device("cpu"), "gemv") == {"PDL_MODE": 0}


@pytest.mark.parametrize("max_num_seqs", [1, 8])
def test_decode_is_bit_identical_with_and_without_pdl(tiny_moe_dir: Path, monkeypatch, max_num_seqs: int) -> None:
    """Graphs and eager steps, batch 1 (GEMV + routing inside GEMM1) and batch 8 (routing in the norm's
    last program, grouped GEMMs): the same tokens and the same logprobs to the bit in modes 0, 1 and 2."""
    from qwenserve.kernels import linear, pdl

    monkeypatch.setitem(linear.GEMV_TILES, (128, 64), (16, 16, 2, 1))  # the tiny model's qkv and o_proj
    monkeypatch.setitem(linear.GEMV_TILES, (64, 64), (16, 16, 4, 1))
    rng = random.Random(5)
    prompts = [[rng.randrange(1, 250) for _ in range(n)] for n in (9, 700, 130, 33, 1500, 64, 5, 401)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    results = {}
    for mode in (0, 2, 1):
        monkeypatch.setattr(pdl, "MODE", mode)
        eng = LLMEngine(EngineConfig(model=str(tiny_moe_dir), device="cuda", dtype="bfloat16", max_model_len=2048,
                                     max_num_seqs=max_num_seqs, num_kv_blocks=512))
        assert eng.runner.graphs is not None
        outs = eng.generate(prompts, params)
        results[mode] = [
            (o.token_ids, [(lp.logprob, lp.top_logprobs) for lp in o.logprobs])
            for choices in outs
            for o in choices
        ]
    assert results[2] == results[0]
    assert results[1] == results[0]
