"""The engine on a GPU with its real fast path: Triton kernels, CUDA graphs and overlapped steps.

Run on the device with `python3 -m pytest -q tests/gpu`; skipped on machines without CUDA.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from qwenserve.config import EngineConfig  # noqa: E402
from qwenserve.engine.llm_engine import LLMEngine  # noqa: E402
from qwenserve.engine.sampling_params import SamplingParams  # noqa: E402


def _engine(path: Path, **overrides: object) -> LLMEngine:
    cfg = dict(model=str(path), device="cuda", dtype="bfloat16", max_model_len=4096, max_num_seqs=8,
               num_kv_blocks=768, max_num_batched_tokens=1024)
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg))


def test_overlapped_graph_steps_match_one_at_a_time(tiny_moe_dir: Path) -> None:
    """Overlapped steps read the previous step's tokens on the device; that must change nothing, also
    when the last sequences left run on the small-batch graphs and one crosses their short-context bound."""
    rng = random.Random(0)
    lengths = [1004, 40, 300, 7, 1021, 900, 2030]
    prompts = [[rng.randrange(1, 250) for _ in range(n)] for n in lengths]
    params = [
        SamplingParams(temperature=0, max_tokens=48, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, repetition_penalty=1.2),
        SamplingParams(temperature=1.0, seed=2, n=2, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=25, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=70, ignore_eos=True),  # alone at the end, crossing 2048
    ]
    results = []
    for async_scheduling in (False, True):
        eng = _engine(tiny_moe_dir, async_scheduling=async_scheduling)
        assert eng.runner.graphs is not None
        outs = eng.generate(prompts, params)
        results.append([(o.token_ids, o.finish_reason) for choices in outs for o in choices])
        bm = eng.block_manager
        assert bm.num_free_blocks == bm.num_usable_blocks
    assert results[0] == results[1]
    assert all(len(toks) == p.max_tokens for (toks, _), p in zip(results[1], params[:3], strict=False))


def test_graphs_match_eager(tiny_moe_dir: Path) -> None:
    """Greedy decode through the captured graphs gives what eager steps give (bf16: nearly always
    the same token; the logits of the first steps must agree closely)."""
    rng = random.Random(1)
    prompts = [[rng.randrange(1, 250) for _ in range(n)] for n in (5, 200, 1500)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    graphed = _engine(tiny_moe_dir).generate(prompts, params)
    eager = _engine(tiny_moe_dir, enforce_eager=True).generate(prompts, params)
    for g, e in zip(graphed, eager, strict=True):
        assert g[0].token_ids[:2] == e[0].token_ids[:2]
        for lg, le in zip(g[0].logprobs[:2], e[0].logprobs[:2], strict=True):
            assert lg.logprob == pytest.approx(le.logprob, abs=0.05)


def test_prefill_graphs_match_eager(tiny_moe_dir: Path) -> None:
    """A short turn that ends its prompt runs from a prefill graph, at every padded length, with split keys
    over a long cached history and without them on a cold prompt; it scores and continues (from the KV the
    graph wrote) as eager steps do."""
    rng = random.Random(3)
    history = [rng.randrange(1, 250) for _ in range(5000)]  # 4,992 tokens cached: 8 + k new tokens a turn
    turns = [history + [rng.randrange(1, 250) for _ in range(k)] for k in (1, 23, 24, 25, 100, 184, 248, 260)]
    cold = [[rng.randrange(1, 250) for _ in range(n)] for n in (2, 40, 200)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    results = []
    for enforce_eager in (False, True):
        eng = _engine(tiny_moe_dir, max_model_len=8192, num_kv_blocks=1024, enforce_eager=enforce_eager)
        eng.generate([history], SamplingParams(max_tokens=1))
        graphs = eng.runner.prefill_graphs
        before = graphs.replays.copy() if graphs is not None else None
        outs = [eng.generate([prompt], params)[0][0] for prompt in turns + cold]
        results.append(outs)
        if not enforce_eager:
            replays = graphs.replays - before
            assert replays.total() == len(turns) - 1 + len(cold)  # the 268-token turn runs eager
            assert {size for size, _ in replays} == {32, 64, 128, 192, 256}
            assert {splits for _, splits in replays} == {1, 8}  # the cold prompts / the turns over 5k keys
        assert all(o.num_cached_tokens == 4992 for o in outs[: len(turns)])
    for graphed, eager in zip(*results, strict=True):
        assert graphed.token_ids[:2] == eager.token_ids[:2]
        for lg, le in zip(graphed.logprobs[:2], eager.logprobs[:2], strict=True):
            assert lg.logprob == pytest.approx(le.logprob, abs=0.05)


def test_kernel_sampler_draws_what_the_torch_sampler_draws(tiny_moe_dir: Path) -> None:
    """qwen-code's sampling (the model's defaults: top-k 20, top-p 0.8, repetition penalty) through
    the Triton sampler gives the tokens the torch sampler gives, seeded, in a mixed batch."""
    rng = random.Random(2)
    prompts = [[rng.randrange(1, 250) for _ in range(n)] for n in (12, 300, 900)]
    params = [
        SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, seed=s, max_tokens=40,
                       ignore_eos=True)
        for s in range(3)
    ]
    params[2].min_p = 0.05
    results = []
    for sampler_kernels in (False, True):
        eng = _engine(tiny_moe_dir)
        eng.runner.sampler_kernels = sampler_kernels
        results.append([o.token_ids for choices in eng.generate(prompts, params) for o in choices])
    assert results[0] == results[1]
    assert len(set(results[1][0])) > 3  # it sampled


def test_sampler_kernels_compile_once_for_every_batch_size(tiny_moe_dir: Path) -> None:
    """A new batch size must not recompile the sampler (a compile stalls every stream for seconds):
    the per-row parameters stay 16-byte aligned whatever the batch size."""
    from qwenserve.kernels import sampling

    eng = _engine(tiny_moe_dir)
    params = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, max_tokens=4, ignore_eos=True)

    def compiled() -> int:
        return sum(len(cache[0]) for cache in sampling._chunk_top_k_kernel.device_caches.values()) + sum(
            len(cache[0]) for cache in sampling._top_k_draw_kernel.device_caches.values())

    eng.generate([[5, 6, 7]], params)
    before = compiled()
    for batch in (2, 3, 5, 8):
        eng.generate([[5 + i, 6, 7] for i in range(batch)], params)
    assert compiled() == before


def test_sampler_graphs_draw_what_the_eager_sampler_draws(tiny_moe_dir: Path) -> None:
    """Sampling replayed as CUDA graphs gives the tokens the eager Triton sampler gives: qwen-code's
    default sampling, min-p, another top-k without penalties, a greedy row among them, batch sizes
    changing as sequences finish, and the penalty buffers growing (moving) mid-run."""
    rng = random.Random(3)
    prompts = [[rng.randrange(1, 250) for _ in range(n)] for n in (12, 300, 900, 40, 7, 77, 500, 20, 33, 260, 5)]
    params = [
        SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, seed=s, max_tokens=20 + 3 * s,
                       ignore_eos=True)
        for s in range(len(prompts))
    ]
    params[2].min_p = 0.05
    params[3] = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    params[4] = SamplingParams(temperature=1.0, top_k=50, seed=9, max_tokens=25, ignore_eos=True)
    results = []
    for graphed in (False, True):
        eng = _engine(tiny_moe_dir, max_num_seqs=12)
        assert eng.runner.sampler_graphs is not None
        if not graphed:
            eng.runner.sampler_graphs = None
        results.append([o.token_ids for choices in eng.generate(prompts, params) for o in choices])
        if graphed:
            assert eng.runner.sampler_graphs.graphs  # steps replayed sampler graphs
            assert eng.runner.penalties.generation > 0  # 9 sequences with penalties outgrew the 7 free rows
    assert results[0] == results[1]
    assert len(set(results[1][0])) > 3  # it sampled


def test_prompt_logprobs_on_the_fast_path(tiny_moe_dir: Path) -> None:
    """Prompt logprobs beside graphed decode steps: a prompt's scored tokens carry the logprobs the
    model gave them when it generated them (bf16 tolerance), and decoding neighbours are unchanged."""
    engine = _engine(tiny_moe_dir)
    rng = random.Random(5)
    start = [rng.randrange(1, 250) for _ in range(300)]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    gen = engine.generate([start], greedy)[0][0]
    neighbour = [rng.randrange(1, 250) for _ in range(50)]
    alone = engine.generate([neighbour], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0][0]
    scored, beside = engine.generate(
        [start + gen.token_ids, neighbour],
        [SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2),
         SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)],
    )  # fmt: skip
    lps = scored[0].prompt_logprobs
    assert len(lps) == len(start) + len(gen.token_ids) and lps[0] is None
    assert [lp.token_id for lp in lps[len(start) :]] == gen.token_ids
    got = [lp.logprob for lp in lps[len(start) :]]
    assert got == pytest.approx([lp.logprob for lp in gen.logprobs], abs=0.1)
    assert beside[0].token_ids == alone.token_ids


def test_profiling_probe_pool_is_freed_before_the_pool_is_sized(tiny_moe_dir: Path) -> None:
    """The activation probe runs one full-size step on a KV pool of its own; that pool must be gone when
    free memory is measured, or the real pool comes out smaller by its size (~0.75 GiB for 30B-A3B)."""
    from qwenserve.engine.model_runner import kv_bytes_per_block

    eng = _engine(tiny_moe_dir)
    probe_blocks = -(-eng.config.max_num_batched_tokens // eng.config.block_size) + 1
    probe_bytes = probe_blocks * kv_bytes_per_block(eng.model_config, eng.config.block_size, eng.dtype, 1)
    before = torch.cuda.memory_allocated()
    eng._profile_activations()  # what sizing the pool runs (it leaves the model's layers unbound)
    assert torch.cuda.memory_allocated() - before < probe_bytes // 2
    assert eng.model.layers[0].self_attn.k_cache is None


def test_logit_bias_on_the_graphed_fast_path(tiny_moe_dir: Path) -> None:
    """A biased request beside unbiased ones on the decode graphs (overlapped steps): +100 makes its
    token win every step, greedy or sampled, and the unbiased row decodes what it decodes in the same
    batch without any bias."""
    rng = random.Random(3)
    prompts = [[rng.randrange(1, 250) for _ in range(n)] for n in (30, 300, 12)]

    def params(bias: dict[int, float] | None) -> list[SamplingParams]:
        return [SamplingParams(temperature=t, top_k=k, seed=5, max_tokens=12, ignore_eos=True, logit_bias=b)
                for t, k, b in ((0, 0, None), (0, 0, bias), (0.9, 20, bias))]  # fmt: skip

    eng = _engine(tiny_moe_dir)
    unbiased = eng.generate(prompts, params(None))
    outs = eng.generate(prompts, params({77: 100.0}))
    assert outs[0][0].token_ids == unbiased[0][0].token_ids
    assert outs[1][0].token_ids == [77] * 12 and outs[2][0].token_ids == [77] * 12


def test_structured_output_on_the_graphed_fast_path() -> None:
    """Guided requests (schema, choice; greedy and with qwen-code's sampling through the sampler kernels)
    beside unguided ones: every guided answer parses, and the unguided rows decode what they decode alone
    although the steps stop overlapping while a guided request runs."""
    import json

    from qwenserve.demo import DEMO_MODEL_DIR
    from qwenserve.engine.guided import Guide

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["ok", "n"], "additionalProperties": False}  # fmt: skip
    eng = _engine(DEMO_MODEL_DIR)
    assert eng.runner.graphs is not None and eng.overlap_steps
    prompts = [eng.tokenizer.encode(t) for t in ("What is the capital of France?", "List the files", "hi")]
    plain = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
             SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, seed=4, max_tokens=20,
                            ignore_eos=True)]  # fmt: skip
    alone = [eng.generate([prompts[i]], plain[i])[0][0].token_ids for i in range(2)]
    qwen_code = dict(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, seed=9)
    guided = [
        SamplingParams(temperature=0, max_tokens=40, guide=Guide("json_schema", json.dumps(schema))),
        SamplingParams(**qwen_code, max_tokens=40, logprobs=2, guide=Guide("json_schema", json.dumps(schema))),
        SamplingParams(**qwen_code, n=2, max_tokens=10, guide=Guide("choice", json.dumps(["yes", "no"]))),
    ]
    outs = eng.generate([prompts[0], prompts[1], prompts[2], prompts[2], prompts[0]], [*plain, *guided])
    assert [outs[0][0].token_ids, outs[1][0].token_ids] == alone
    for choice in (outs[2][0], outs[3][0]):
        value = json.loads(choice.text)
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and choice.finish_reason == "stop"
    assert all(math.isfinite(lp.logprob) for lp in outs[3][0].logprobs)
    assert sorted(c.text for c in outs[4]) in (["no", "no"], ["no", "yes"], ["yes", "yes"])
    assert eng._num_guided_requests == 0 and eng.block_manager.usage() == 0
    # A dead end (the string may open, but its pattern admits no character), sampled through the kernels
    # beside an unguided row: the guided one ends as a dead end, the other decodes what it decodes alone.
    impossible = {"type": "object", "properties": {"a": {"type": "string", "pattern": "[^\\s\\S]"}},
                  "required": ["a"]}  # fmt: skip
    dead = SamplingParams(**qwen_code, max_tokens=20, guide=Guide("json_schema", json.dumps(impossible)))
    outs = eng.generate([prompts[1], prompts[0]], [plain[1], dead])
    assert outs[0][0].token_ids == alone[1] and outs[1][0].finish_reason == "grammar_dead_end"
    assert eng._num_guided_requests == 0 and eng.block_manager.usage() == 0


@pytest.mark.parametrize("head_dim", [16, 64])
def test_long_chunks_on_cudnn_score_what_triton_scores(tmp_path: Path, monkeypatch, head_dim: int) -> None:
    """Chunks over a long prefix attend through cuDNN (thresholds lowered to reach the tiny model's
    prompts). Every prompt position's logprob is teacher-forced and compared with a float32 run: cuDNN's
    must be as close to it as the Triton kernel's bf16 run is (in a random MoE a bf16 rounding may flip a
    token's expert, so a few positions move in either bf16 run; a wrong merge or gather moves them all)."""
    from tiny_models import make_tiny_checkpoint

    from qwenserve.kernels import attention, cudnn_attention

    model_dir = make_tiny_checkpoint(tmp_path, moe=True, head_dim=head_dim)
    rng = random.Random(4)
    prompts = [[rng.randrange(1, 250) for _ in range(n)] for n in (2500, 700, 9)]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    monkeypatch.setattr(cudnn_attention, "_disabled", False)  # whatever QWENSERVE_CUDNN_PREFILL says
    chunk_attention = cudnn_attention.chunk_attention
    calls: list[int] = []
    monkeypatch.setattr(cudnn_attention, "chunk_attention", lambda q, *a: calls.append(q.shape[0]) or chunk_attention(q, *a))
    reference = _engine(model_dir, dtype="float32").generate(prompts, params)
    results = []
    for enabled in (False, True):
        monkeypatch.setattr(attention, "DENSE_PREFILL_MIN_QUERY", 64 if enabled else attention._NEVER)
        if enabled:
            monkeypatch.setattr(attention, "DENSE_PREFILL_MIN_PAIRS", 0)
        results.append(_engine(model_dir).generate(prompts, params))
        assert bool(calls) == enabled
    assert cudnn_attention.usable(head_dim, torch.bfloat16) is True  # it ran, rather than falling back

    def errors(outs: list) -> list[float]:
        return [abs(a.logprob - b.logprob) for out, ref in zip(outs, reference, strict=True)
                for a, b in zip(out[0].prompt_logprobs[1:], ref[0].prompt_logprobs[1:], strict=True)]

    def summary(errors: list[float]) -> tuple[float, float]:  # mean and 99th percentile
        return sum(errors) / len(errors), sorted(errors)[len(errors) * 99 // 100]

    (triton_mean, triton_p99), (cudnn_mean, cudnn_p99) = summary(errors(results[0])), summary(errors(results[1]))
    stats = f"mean |error| triton {triton_mean:.4f} cudnn {cudnn_mean:.4f}, p99 {triton_p99:.3f} {cudnn_p99:.3f}"
    print(f"head_dim {head_dim}: {stats}")
    assert cudnn_mean < 1.5 * triton_mean + 1e-3, stats
    assert cudnn_p99 < 1.5 * triton_p99 + 0.02, stats
