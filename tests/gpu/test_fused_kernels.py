"""The fused norm / RoPE / router kernels against their torch references (bf16 on CUDA)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from qwenserve.config import RopeConfig  # noqa: E402
from qwenserve.model import ops  # noqa: E402
from qwenserve.model.rope import build_cos_sin_cache  # noqa: E402


@pytest.mark.parametrize("shape", [(1, 32, 4, 128), (77, 32, 4, 128), (300, 4, 2, 16)])
def test_qk_norm_rope_cache(shape: tuple[int, int, int, int]) -> None:
    from qwenserve.kernels.fused import qk_norm_rope_cache

    t, h, kvh, d = shape
    torch.manual_seed(0)
    qkv = torch.randn(t, (h + 2 * kvh) * d, device="cuda", dtype=torch.bfloat16)
    qw = 1 + 0.1 * torch.randn(d, device="cuda", dtype=torch.bfloat16)
    kw = 1 + 0.1 * torch.randn(d, device="cuda", dtype=torch.bfloat16)
    cache = build_cos_sin_cache(RopeConfig(theta=1e7), d, 40000, torch.device("cuda"))
    pos = torch.randint(0, 40000, (t,), device="cuda")
    slots = torch.randperm(64 * 16, device="cuda")[:t]
    slots[0] = -1  # a skipped (padded) row
    caches = [torch.zeros(64, 16, kvh, d, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    got_q = qk_norm_rope_cache(qkv, qw, kw, cache, pos, h, kvh, d, 1e-6, caches[0], caches[1], slots)
    q, k, v = ops.qk_norm_rope(qkv, qw, kw, cache, pos, h, kvh, d, 1e-6)
    ops.write_kv_cache(k[1:], v[1:], caches[2], caches[3], slots[1:])
    torch.testing.assert_close(got_q, q, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(caches[0], caches[2], atol=3e-2, rtol=2e-2)
    assert torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("rows", [1, 64, 1000])
def test_add_rms_norm(rows: int) -> None:
    from qwenserve.kernels.fused import add_rms_norm

    x = torch.randn(rows, 2048, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(rows, 2048, device="cuda", dtype=torch.bfloat16)
    w = 1 + 0.1 * torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    out, res = add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_res = ops.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(res, ref_res)
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("rows", [1, 77])
def test_add_rms_norm_sums_unreduced_moe_terms(rows: int) -> None:
    """x [T, k, H] (fused_moe reduce=False) is summed in the norm's pass: the same as reducing first."""
    from qwenserve.kernels.fused import add_rms_norm
    from qwenserve.kernels.moe import fused_moe, moe_sum

    x = torch.randn(rows, 8, 2048, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(rows, 2048, device="cuda", dtype=torch.bfloat16)
    w = 1 + 0.1 * torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    out, res = add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_res = add_rms_norm(moe_sum(x), r, w, 1e-6)
    assert torch.equal(res, ref_res) and torch.equal(out, ref_out)
    torch.testing.assert_close(res, ops.add_rms_norm(x, r, w, 1e-6)[1], atol=3e-2, rtol=2e-2)

    h = torch.randn(rows, 2048, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(16, 2 * 128, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(16, 2048, 128, device="cuda", dtype=torch.bfloat16) * 0.05
    weights, ids = torch.rand(rows, 4, device="cuda").softmax(-1), torch.randint(0, 16, (rows, 4), device="cuda")
    terms = fused_moe(h, w13, w2, weights, ids, reduce=False)
    assert terms.shape == (rows, 4, 2048)
    assert torch.equal(moe_sum(terms), fused_moe(h, w13, w2, weights, ids))
    ref_terms = ops.fused_moe(h.float(), w13.float(), w2.float(), weights, ids, reduce=False)
    torch.testing.assert_close(terms.float(), ref_terms, atol=2e-2, rtol=5e-2)


@pytest.mark.parametrize("tokens", [1, 63, 64, 4096])
def test_route(tokens: int) -> None:
    from qwenserve.kernels.fused import route

    x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(128, 2048, device="cuda", dtype=torch.bfloat16) * 0.05
    w, ids = route(x, gate, 8, True)
    ref_w, ref_ids = ops.route(x, gate, 8, True)
    # Equal bf16 logits tie, and ties may be ordered differently: check that every chosen expert is
    # among the k most probable (up to ties and rounding) and that no expert is chosen twice.
    probs = torch.softmax(torch.nn.functional.linear(x, gate), dim=-1, dtype=torch.float32)
    kth = probs.topk(8, dim=-1).values[:, -1:]
    assert (probs.gather(1, ids.long()) >= kth * 0.98 - 1e-6).all()
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all()
    torch.testing.assert_close(w.float().sum(-1), torch.ones(tokens, device="cuda"), atol=2e-2, rtol=0)
    torch.testing.assert_close(w.float().sort(-1).values, ref_w.float().sort(-1).values, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(1, 128, 8, 16), (7, 128, 8, 16), (16, 128, 8, 16), (5, 8, 2, 32)])
def test_route_align_equals_route_then_align(tokens: int, experts: int, top_k: int, block_m: int) -> None:
    from qwenserve.kernels.fused import router_topk
    from qwenserve.kernels.moe import moe_align, route_align

    logits = torch.randn(tokens, experts, device="cuda", dtype=torch.bfloat16)
    w, ids, sorted_ids, expert_ids, num_rows = route_align(logits, top_k, True, block_m, torch.bfloat16)
    ref_w, ref_ids = router_topk(logits, top_k, True, torch.bfloat16)
    ref_sorted, ref_experts, ref_rows = moe_align(ref_ids, experts, block_m)
    assert torch.equal(ids, ref_ids) and torch.equal(w, ref_w)
    n = int(num_rows)
    assert n == int(ref_rows)
    assert torch.equal(sorted_ids[:n], ref_sorted[:n]) and torch.equal(expert_ids[: n // block_m], ref_experts[: n // block_m])


@pytest.mark.parametrize("tokens", [1, 16, 17, 300])
def test_routed_moe(tokens: int) -> None:
    from qwenserve.kernels.fused import route
    from qwenserve.kernels.moe import routed_moe

    h = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(128, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    w13 = torch.randn(128, 2 * 768, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(128, 2048, 768, device="cuda", dtype=torch.bfloat16) * 0.03
    out = routed_moe(h, gate, w13, w2, 8, True)
    weights, ids = route(h, gate, 8, True)  # the kernel's own tie-breaking; checked against torch in test_route
    ref = ops.fused_moe(h.float(), w13.float(), w2.float(), weights.float(), ids, reduce=False)
    assert out.shape == (tokens, 8, 2048)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=5e-2)


@pytest.mark.parametrize("tokens,block_e", [(1, 4), (3, 8), (16, 4), (16, 2)])
def test_norm_route_align_equals_norm_then_route_then_align(tokens: int, block_e: int, monkeypatch) -> None:
    """One launch (norm, router GEMV, top-k, align by its last program) gives what the three ops give."""
    from qwenserve.kernels import moe
    from qwenserve.kernels.fused import add_rms_norm, router_topk

    monkeypatch.setattr(moe, "NORM_ROUTE_BLOCK_E", block_e)
    x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
    w = 1 + 0.1 * torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(128, 2048, device="cuda", dtype=torch.bfloat16) * 0.05
    ref_out, ref_res = add_rms_norm(x, r, w, 1e-6)
    probs = torch.softmax(torch.nn.functional.linear(ref_out, gate), dim=-1, dtype=torch.float32)
    kth = probs.topk(8, dim=-1).values[:, -1:]
    for _ in range(3):  # the launch counter must be back at 0 after every launch
        out, res, weights, ids, sorted_ids, expert_ids, num_rows = moe.norm_route_align(x, r, w, 1e-6, gate, 8, True, 16)
        assert torch.equal(res, ref_res) and torch.equal(out, ref_out)
        assert (probs.gather(1, ids.long()) >= kth * 0.98 - 1e-6).all()
        assert (ids.sort(-1).values.diff(dim=-1) > 0).all()
        ref_w, _ = router_topk(torch.log(probs), 8, True, torch.bfloat16)
        torch.testing.assert_close(weights.float().sort(-1).values, ref_w.float().sort(-1).values, atol=2e-2, rtol=2e-2)
        ref_sorted, ref_experts, ref_rows = moe.moe_align(ids, 128, 16)
        n = int(num_rows)
        assert n == int(ref_rows)
        assert torch.equal(sorted_ids[:n], ref_sorted[:n]) and torch.equal(expert_ids[: n // 16], ref_experts[: n // 16])
        assert int(moe._launch_counter(x.device)) == 0


@pytest.mark.parametrize("tokens", [1, 5, 16, 17])
def test_norm_routed_moe(tokens: int) -> None:
    from qwenserve.kernels.fused import add_rms_norm, route
    from qwenserve.kernels.moe import norm_route_align, norm_routed_moe

    x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
    w = 1 + 0.1 * torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(128, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    w13 = torch.randn(128, 2 * 768, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(128, 2048, 768, device="cuda", dtype=torch.bfloat16) * 0.03
    out, res = norm_routed_moe(x, r, w, 1e-6, gate, w13, w2, 8, True)
    h, ref_res = add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(res, ref_res)
    # The kernels' own routing (checked against torch above and in test_route), the torch experts.
    if tokens <= 16:
        weights, ids = norm_route_align(x, r, w, 1e-6, gate, 8, True, 16)[2:4]
    else:
        weights, ids = route(h, gate, 8, True)
    ref = ops.fused_moe(h.float(), w13.float(), w2.float(), weights.float(), ids, reduce=False)
    assert out.shape == (tokens, 8, 2048)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=5e-2)


@pytest.mark.parametrize("pdl_mode", [1, 2])  # 2: GEMM2 routes after its wait
@pytest.mark.parametrize("tokens", [1, 2, 4])
def test_routing_inside_gemm1_equals_routing_tail(tokens: int, pdl_mode: int, monkeypatch) -> None:
    """Both GEMMs routing the tokens themselves give the same terms, bit for bit, as the routing tail
    of norm_route_align followed by the two GEMMs, eagerly and replayed in a CUDA graph with new inputs."""
    from qwenserve.kernels import moe, pdl

    monkeypatch.setattr(pdl, "MODE", pdl_mode)
    gate = torch.randn(128, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    w13 = torch.randn(128, 2 * 768, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(128, 2048, 768, device="cuda", dtype=torch.bfloat16) * 0.03
    w = 1 + 0.1 * torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)

    def run(route_in_gemm1: bool) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(moe, "ROUTE_IN_GEMM1_MAX_TOKENS", tokens if route_in_gemm1 else 0)
        return moe.norm_routed_moe(x, r, w, 1e-6, gate, w13, w2, 8, True)

    for _ in range(2):
        (tail_out, tail_res), (out, res) = run(False), run(True)
        assert torch.equal(out, tail_out) and torch.equal(res, tail_res)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, res = run(True)
    for seed in range(3):
        torch.manual_seed(seed)
        x.copy_(torch.randn_like(x))
        r.copy_(torch.randn_like(r))
        graph.replay()
        tail_out, tail_res = run(False)
        assert torch.equal(out, tail_out) and torch.equal(res, tail_res)
