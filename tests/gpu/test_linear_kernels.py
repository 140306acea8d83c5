"""One-token projections as split-K terms (kernels/linear.py) and the kernels that sum them."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from qwenserve.config import EngineConfig, RopeConfig  # noqa: E402
from qwenserve.engine.llm_engine import LLMEngine  # noqa: E402
from qwenserve.engine.sampling_params import SamplingParams  # noqa: E402
from qwenserve.model import ops  # noqa: E402
from qwenserve.model.rope import build_cos_sin_cache  # noqa: E402


def _reduced(terms: torch.Tensor) -> torch.Tensor:
    """The terms summed in the kernels' order (term 0 first, float32), rounded to bf16 once."""
    acc = terms[:, 0].clone()
    for t in range(1, terms.shape[1]):
        acc += terms[:, t]
    return acc.to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(2048, 4096), (5120, 2048)])
def test_linear_unreduced_terms_sum_to_the_product(shape: tuple[int, int]) -> None:
    from qwenserve.kernels.linear import GEMV_TILES, linear_unreduced

    n, k = shape
    torch.manual_seed(0)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    terms = linear_unreduced(x, w)
    assert terms.shape == (1, GEMV_TILES[shape][2], n) and terms.dtype == torch.float32
    exact = x.double() @ w.double().t()
    torch.testing.assert_close(terms.sum(1).double(), exact, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_reduced(terms), torch.nn.functional.linear(x, w), atol=2e-2, rtol=1e-2)
    two = torch.randn(2, k, device="cuda", dtype=torch.bfloat16)  # more tokens than GEMV_MAX_ROWS: cuBLAS
    assert torch.equal(linear_unreduced(two, w), torch.nn.functional.linear(two, w))
    odd = torch.randn(1, 96, device="cuda", dtype=torch.bfloat16)  # a shape without a tile: cuBLAS
    assert linear_unreduced(odd, torch.randn(64, 96, device="cuda", dtype=torch.bfloat16)).dim() == 2


def test_add_rms_norm_sums_split_k_terms() -> None:
    from qwenserve.kernels.fused import add_rms_norm

    terms = torch.randn(1, 4, 2048, device="cuda") * 0.3
    r = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    w = 1 + 0.1 * torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    out, res = add_rms_norm(terms, r, w, 1e-6)
    ref_out, ref_res = add_rms_norm(_reduced(terms), r, w, 1e-6)
    assert res.dtype == torch.bfloat16 and torch.equal(res, ref_res) and torch.equal(out, ref_out)
    torch.testing.assert_close(ops.add_rms_norm(terms, r, w, 1e-6)[1], ref_res, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("route", [False, True])
def test_norm_route_align_sums_split_k_terms(route: bool) -> None:
    from qwenserve.kernels import moe

    terms = torch.randn(1, 4, 2048, device="cuda") * 0.3
    r = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    w = 1 + 0.1 * torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(128, 2048, device="cuda", dtype=torch.bfloat16) * 0.05
    got = moe.norm_route_align(terms, r, w, 1e-6, gate, 8, True, 16, route=route)
    want = moe.norm_route_align(_reduced(terms), r, w, 1e-6, gate, 8, True, 16, route=route)
    for g, e in zip(got, want, strict=True):
        assert g.dtype == e.dtype and torch.equal(g, e)


def test_qk_norm_rope_cache_sums_split_k_terms() -> None:
    from qwenserve.kernels.fused import qk_norm_rope_cache

    h, kvh, d = 32, 4, 128
    torch.manual_seed(1)
    terms = torch.randn(1, 4, (h + 2 * kvh) * d, device="cuda")
    qw = 1 + 0.1 * torch.randn(d, device="cuda", dtype=torch.bfloat16)
    kw = 1 + 0.1 * torch.randn(d, device="cuda", dtype=torch.bfloat16)
    cos_sin = build_cos_sin_cache(RopeConfig(theta=1e7), d, 4096, torch.device("cuda"))
    pos = torch.tensor([1234], device="cuda")
    slots = torch.tensor([37], device="cuda")
    caches = [torch.zeros(8, 16, kvh, d, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    q = qk_norm_rope_cache(terms, qw, kw, cos_sin, pos, h, kvh, d, 1e-6, caches[0], caches[1], slots)
    ref_q = qk_norm_rope_cache(_reduced(terms), qw, kw, cos_sin, pos, h, kvh, d, 1e-6, caches[2], caches[3], slots)
    assert q.dtype == torch.bfloat16 and torch.equal(q, ref_q)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    torch_q = ops.qk_norm_rope(terms, qw, kw, cos_sin, pos, h, kvh, d, 1e-6)[0]
    torch.testing.assert_close(torch_q, ref_q, atol=3e-2, rtol=2e-2)


def test_engine_decodes_the_same_with_the_split_k_gemv(tiny_moe_dir: Path, monkeypatch) -> None:
    """The tiny model's projections get GEMV tiles: batch-1 decode (CUDA graphs) must give what cuBLAS gives."""
    from qwenserve.kernels import linear

    monkeypatch.setitem(linear.GEMV_TILES, (128, 64), (16, 16, 2, 1))  # qkv: 4 q + 2 x 2 kv heads of 16
    monkeypatch.setitem(linear.GEMV_TILES, (64, 64), (16, 16, 4, 1))  # o_proj
    rng = random.Random(3)
    prompts = [[rng.randrange(1, 250) for _ in range(n)] for n in (9, 700)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    results = []
    for max_rows in (1, 0):
        monkeypatch.setattr(linear, "GEMV_MAX_ROWS", max_rows)
        eng = LLMEngine(EngineConfig(model=str(tiny_moe_dir), device="cuda", dtype="bfloat16", max_model_len=2048,
                                     max_num_seqs=1, num_kv_blocks=256))
        assert eng.runner.graphs is not None
        results.append([eng.generate([p], params)[0][0] for p in prompts])
    for gemv, cublas in zip(*results, strict=True):
        assert gemv.token_ids[:4] == cublas.token_ids[:4]
        for a, b in zip(gemv.logprobs[:4], cublas.logprobs[:4], strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=0.05)
