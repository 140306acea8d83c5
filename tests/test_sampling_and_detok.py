"""Sampler masks and noise, incremental detokenization and stop-string holding."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from qwenserve.config import EngineConfig
from qwenserve.engine.async_engine import AsyncEngine, EngineDeadError, GenerationFailedError, QueueFullError
from qwenserve.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from qwenserve.engine.sampler import SamplingBatch, gumbel_noise, num_candidates_for, sample
from qwenserve.engine.sampling_params import InvalidRequestError, SamplingParams


def _batch(rows: int, **kw) -> SamplingBatch:
    base = dict(
        temperature=torch.ones(rows),
        top_p=torch.ones(rows),
        top_k=torch.zeros(rows, dtype=torch.int64),
        min_p=torch.zeros(rows),
        seeds=torch.arange(rows, dtype=torch.int64),
        steps=torch.zeros(rows, dtype=torch.int64),
    )
    base.update(kw)
    return SamplingBatch(**base)


def test_noise_depends_only_on_seed_and_step() -> None:
    a = gumbel_noise(torch.tensor([7, 8, 7]), torch.tensor([3, 3, 3]), 1000)
    assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
    b = gumbel_noise(torch.tensor([7]), torch.tensor([4]), 1000)
    assert not torch.equal(a[0], b[0])
    # Gumbel(0,1) has mean ~0.577 and std ~1.28.
    big = gumbel_noise(torch.arange(64), torch.zeros(64, dtype=torch.int64), 20000)
    assert abs(big.mean().item() - 0.5772) < 0.02 and abs(big.std().item() - 1.2825) < 0.02


def test_a_row_draws_the_same_beside_a_row_without_top_k() -> None:
    """A top-k row batched with a top-k-off row samples from the whole sorted vocabulary; it must draw
    what it draws alone (from its top candidates), at every step. The draw once added Gumbel noise to
    -inf for cut tokens, and a token whose noise was +inf (a float32 rounding, ~1 % of full-vocabulary
    draws) became NaN and won the argmax: a token far outside the row's top-k."""
    vocab = 151936
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0)) * 3
    for step in range(400):
        steps = torch.full((2,), step, dtype=torch.int64)
        pair = _batch(2, temperature=torch.full((2,), 0.8), top_k=torch.tensor([20, 0]), top_p=torch.full((2,), 0.8),
                      steps=steps, needs_top_k_p=True)
        alone = _batch(1, temperature=torch.full((1,), 0.8), top_k=torch.tensor([20]), top_p=torch.full((1,), 0.8),
                       steps=steps[:1], needs_top_k_p=True, num_candidates=32)
        assert sample(logits, pair).token_ids[0] == sample(logits[:1], alone).token_ids[0], step
    assert torch.isfinite(gumbel_noise(torch.arange(8), torch.zeros(8, dtype=torch.int64), vocab)).all()


def test_top_k_fast_path_keeps_the_lowest_ids_of_a_tie() -> None:
    """A tie group crossing the candidates' cut keeps its lowest ids, as the full sort does: a seeded
    row draws the same on the fast path (alone) as beside a top-k-off row (full sort)."""
    logits = torch.cat([torch.full((10,), 3.0), torch.full((10,), 2.0), torch.zeros(44)])[None, :]
    for seed in range(300):
        seeds = torch.tensor([seed, seed])
        alone = _batch(1, top_k=torch.tensor([12]), seeds=seeds[:1], needs_top_k_p=True, num_candidates=16)
        pair = _batch(2, top_k=torch.tensor([12, 0]), seeds=seeds, needs_top_k_p=True)
        token = sample(logits, alone).token_ids[0]
        assert token < 12 and token == sample(logits.repeat(2, 1), pair).token_ids[0], seed


def test_top_p_one_keeps_the_tail_beside_a_top_p_row() -> None:
    """top_p 1 is off (as in Transformers and vLLM): a row with it draws the same from the sorted candidates
    (beside a top-p row) as from the unsorted logits (alone). Token 1 has probability 2.5e-8, so in float32
    token 0's is 1.0 and the cumsum before token 1 reached top_p; seed 3651563's noise picks token 1."""
    logits = torch.tensor([[0.0, -17.5]])
    seeds = torch.full((2,), 3651563)
    alone = sample(logits, _batch(1, seeds=seeds[:1])).token_ids[0]
    beside = sample(logits.repeat(2, 1), _batch(2, seeds=seeds, top_p=torch.tensor([1.0, 0.5]), needs_top_k_p=True))
    assert alone == 1 and beside.token_ids[0] == alone


def test_top_k_top_p_min_p_restrict_the_support() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(300, 1)
    seeds = torch.arange(300, dtype=torch.int64)
    top_k = sample(logits, _batch(300, seeds=seeds, top_k=torch.full((300,), 2), needs_top_k_p=True))
    assert set(top_k.token_ids.tolist()) == {0, 1}
    top_p = sample(logits, _batch(300, seeds=seeds, top_p=torch.full((300,), 0.7), needs_top_k_p=True))
    assert set(top_p.token_ids.tolist()) == {0, 1}
    min_p = sample(logits, _batch(300, seeds=seeds, min_p=torch.full((300,), 0.35), needs_min_p=True))
    assert set(min_p.token_ids.tolist()) == {0, 1}
    free = sample(logits, _batch(300, seeds=seeds))
    assert set(free.token_ids.tolist()) == {0, 1, 2, 3}


def test_penalties_push_seen_tokens_down() -> None:
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = torch.tensor([[True, False, True]])
    counts = torch.tensor([[3, 0, 0]])
    out = sample(
        logits,
        _batch(
            1,
            temperature=torch.zeros(1),
            repetition_penalty=torch.tensor([1.5]),
            frequency_penalty=torch.tensor([0.1]),
            presence_penalty=torch.tensor([0.0]),
            seen=seen,
            counts=counts,
            penalty_rows=torch.tensor([0]),
            all_greedy=True,
        ),
    )
    assert out.token_ids.tolist() == [1]


def test_top_k_candidates_draw_what_the_full_sort_draws() -> None:
    """Sampling from a topk of the logits is the full-vocabulary algorithm, not an approximation."""
    gen = torch.Generator().manual_seed(0)
    rows, vocab = 64, 5000
    logits = torch.randn(rows, vocab, generator=gen) * 3
    kw = dict(
        temperature=torch.rand(rows, generator=gen) + 0.3,
        top_k=torch.randint(1, 40, (rows,), generator=gen),
        top_p=torch.rand(rows, generator=gen) * 0.9 + 0.1,
        min_p=torch.rand(rows, generator=gen) * 0.2,
        seeds=torch.randint(0, 2**32, (rows,), generator=gen),
        steps=torch.randint(0, 1000, (rows,), generator=gen),
        needs_top_k_p=True,
        needs_min_p=True,
    )
    kw["temperature"][::7] = 0.0  # greedy rows mixed in
    full = sample(logits, _batch(rows, **kw)).token_ids
    top = sample(logits, _batch(rows, **kw, num_candidates=num_candidates_for([40]))).token_ids
    assert torch.equal(full, top)
    assert torch.equal(full[::7], logits[::7].argmax(-1))
    assert len(set(full.tolist())) > rows // 2  # it really sampled


def test_num_candidates_needs_a_top_k_on_every_sampling_row() -> None:
    assert num_candidates_for([20]) == 32 and num_candidates_for([3, 1]) == 16
    assert num_candidates_for([20, 0]) == 0 and num_candidates_for([]) == 0
    assert num_candidates_for([257]) == 0 and num_candidates_for([256]) == 256


def test_invalid_sampling_params_name_the_field() -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(top_p=0.0)
    assert err.value.param == "top_p"
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(logprobs=21)
    assert err.value.param == "top_logprobs"


def test_incremental_detokenizer_never_splits_characters(tiny_moe_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_moe_dir)
    text = "héllo wörld 世界 🎉 code()"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    pieces = [detok.add(i) for i in ids + [tok.eos_token_id]]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p) > 10  # it really streamed


def test_detokenized_output_is_its_own_ids_after_a_prompt_cut_mid_character(tiny_moe_dir: Path) -> None:
    """A token-id prompt may end inside a character; the output's bytes that finish it stay its own."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_moe_dir)
    ids = tok.encode("Hello 𝔘 world", add_special_tokens=False)
    cut = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tok, ids[:cut], skip_special_tokens=True)
    text = "".join(detok.add(i) for i in ids[cut:]) + detok.flush()
    assert text == tok.decode(ids[cut:]) and text.endswith(" world")


def test_stop_matcher_holds_back_only_possible_prefixes() -> None:
    m = StopStringMatcher(["END"])
    assert m.add("abc") == ("a", None)
    assert m.add("E") == ("b", None)
    assert m.add("N") == ("c", None)
    assert m.add("Dx") == ("", "END")
    before_min = StopStringMatcher(["France"])  # inactive (min_tokens not reached): nothing matches...
    assert before_min.add("The capital of France", active=False) == ("The capital of F", None)
    assert before_min.add(" is Fr", active=True) == ("rance ", None)  # ...nor later what it passed,
    assert before_min.add("ance.", active=True) == ("is ", "France")  # but one ending after it does
    # A longer stop string holds more text back; what it holds from before min_tokens still cannot match.
    longer = StopStringMatcher(["France", "a-much-longer-stop"])
    first, hit = longer.add("The capital of France", active=False)
    assert hit is None
    second, hit = longer.add(" is Paris.", active=True)
    assert hit is None and first + second + longer.flush() == "The capital of France is Paris."
    m2 = StopStringMatcher(["</stop>"], include_stop=True)
    assert m2.add("hi </st")[1] is None
    out, hit = m2.add("op> tail")
    assert hit == "</stop>" and out.endswith("</stop>")


def test_stop_strings_never_match_inside_a_control_token() -> None:
    """`<tool_call>` is one token: a stop string matches it only whole (or ending with it), never a
    piece of it, and a prefix held back before it is released with it."""
    m = StopStringMatcher(["a", "<"])
    assert m.add_control("<tool_call>") == ("<tool_call>", None)
    assert m.add("\nab")[1] == "a"
    held = StopStringMatcher(["<tool"])
    assert held.add("x <to") == ("x", None)  # " <to" may begin the stop string: held back
    assert held.add_control("<tool_call>") == (" <to<tool_call>", None)
    whole = StopStringMatcher(["\n<tool_call>", "<|im_end|>"], include_stop=True)
    assert whole.add("Done.\n") == ("", None)
    assert whole.add_control("<tool_call>") == ("Done.\n<tool_call>", "\n<tool_call>")
    assert StopStringMatcher(["<|im_end|>"]).add_control("<|im_end|>") == ("", "<|im_end|>")
    assert StopStringMatcher(["<tool_call>"]).add_control("<tool_call>", active=False) == ("<tool_call>", None)
    both = StopStringMatcher(["<tool_call>", "\n<tool_call>"])  # the earliest start wins, as in add
    assert both.add("x\n") == ("", None) and both.add_control("<tool_call>") == ("x", "\n<tool_call>")
    # The detokenizer hands the token over with a partial character it completed ("\ufffd<tool_call>"):
    # that character is ordinary text before the token, and the token still ends the stop string.
    after_partial = StopStringMatcher(["<tool_call>"])
    assert after_partial.add_control("Hi \ufffd<tool_call>", token_text="<tool_call>") == ("Hi \ufffd", "<tool_call>")
    skipped = StopStringMatcher(["abc"])  # a special token the detokenizer skips (empty text) is no boundary
    assert skipped.add("ab") == ("", None) and skipped.add_control("") == ("", None)
    assert skipped.add("c") == ("", "abc")


def test_a_burst_fills_free_running_slots_before_the_queue_limit(tiny_moe_dir: Path) -> None:
    """Four running slots and one queue place: five requests added back to back (before the engine
    thread takes any in) are all accepted; they are not all 'waiting'."""

    async def main() -> None:
        cfg = EngineConfig(model=str(tiny_moe_dir), device="cpu", dtype="float32", num_kv_blocks=64,
                           max_num_seqs=4, max_queued_requests=1)  # fmt: skip
        engine = AsyncEngine(cfg)
        await engine.start()
        try:
            params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
            for i in range(5):
                engine.add_request(f"r{i}", [1, 2, 3], params)
            while engine.stats().num_running_seqs < 4:
                await asyncio.sleep(0.01)
            for i in range(5):
                engine.abort(f"r{i}")
            while engine.stats().num_running_seqs or engine.stats().num_waiting:
                await asyncio.sleep(0.01)
            # An n = 4 request fills the four slots: then the queue's one place is all that is left.
            engine.add_request("wide", [1, 2, 3], SamplingParams(temperature=1, n=4, max_tokens=10_000, ignore_eos=True))
            while engine.stats().num_running_seqs < 4:
                await asyncio.sleep(0.01)
            engine.add_request("waits", [1, 2, 3], params)
            with pytest.raises(QueueFullError):
                engine.add_request("refused", [1, 2, 3], params)
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_async_engine_streams_and_aborts(tiny_moe_dir: Path) -> None:
    async def main() -> None:
        cfg = EngineConfig(model=str(tiny_moe_dir), device="cpu", dtype="float32", num_kv_blocks=64)
        engine = AsyncEngine(cfg)
        await engine.start()
        try:
            params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
            outs = [o async for o in engine.add_request("a", [1, 2, 3, 4], params)]
            assert outs[-1].finish_reason == "length" and sum(len(o.token_ids) for o in outs) == 6
            assert len(outs) >= 2  # increments, not one final blob

            long = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
            stream = engine.add_request("b", [5, 6, 7], long)
            async for out in stream:
                if out.num_generated_tokens >= 2:
                    engine.abort("b")
                if out.finished:
                    assert out.finish_reason == "abort"
            await asyncio.sleep(0.2)
            stats = engine.stats()
            assert stats.num_free_blocks == stats.num_kv_blocks and stats.num_running == 0

            with pytest.raises(InvalidRequestError):
                engine.add_request("c", list(range(5000)), params)
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_equal_logits_are_ordered_by_token_id() -> None:
    """Ties (frequent in bf16) are cut by top-k in id order, with and without the topk shortcut."""
    logits = torch.zeros(200, 100)
    logits[:, 50:60] = 1.0  # 10 tied best tokens (fewer than the 16 candidates)
    kw = dict(top_k=torch.full((200,), 5), needs_top_k_p=True, seeds=torch.arange(200, dtype=torch.int64))
    full = sample(logits, _batch(200, **kw)).token_ids
    top = sample(logits, _batch(200, **kw, num_candidates=num_candidates_for([5]))).token_ids
    assert set(full.tolist()) == set(range(50, 55)) and torch.equal(full, top)


def _seqs(*params: SamplingParams) -> list:
    from qwenserve.engine.sequence import Sequence

    return [Sequence(f"r{i}", 0, [1, 2, 3], p, seed=i) for i, p in enumerate(params)]


def test_sampler_graph_mode_takes_what_the_graphed_kernels_can() -> None:
    """Which steps replay a sampler CUDA graph (engine/sampler_graphs.py) and under which mode."""
    from qwenserve.engine.sampler_graphs import SamplerMode, sampler_mode

    qwen_code = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    greedy = SamplingParams(temperature=0.0)
    assert sampler_mode(_seqs(qwen_code), 64) == SamplerMode(32, True, False)
    assert sampler_mode(_seqs(greedy, qwen_code), 64) == SamplerMode(32, True, False)  # greedy rows ride along
    assert sampler_mode(_seqs(SamplingParams(temperature=1.0, top_k=50, min_p=0.1)), 64) == SamplerMode(64, False, True)
    assert sampler_mode(_seqs(greedy), 64) is None  # the decode graph's own argmax
    assert sampler_mode(_seqs(SamplingParams(temperature=1.0)), 64) is None  # no top-k: the eager sampler
    assert sampler_mode(_seqs(SamplingParams(temperature=1.0, top_k=100)), 64) is None  # beyond the kernels
    assert sampler_mode(_seqs(qwen_code, SamplingParams(temperature=0.0, logprobs=2)), 64) is None


def test_param_rows_pad_with_neutral_rows() -> None:
    """Padded graph rows sample greedily with no penalty; every row stays a multiple of 4 entries wide."""
    from qwenserve.engine.sampler_graphs import param_rows

    params = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, presence_penalty=0.5)
    floats, ints = param_rows(_seqs(params), 4)
    assert floats == [[0.7, 0.0, 0.0, 0.0], [0.8, 1.0, 1.0, 1.0], [0.0] * 4, [0.5, 0.0, 0.0, 0.0], [0.0] * 4,
                      [1.05, 1.0, 1.0, 1.0]]
    assert ints == [[20, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_async_engine_step_failure_and_gpu_fault(tiny_moe_dir: Path) -> None:
    """A failing step fails the requests it ran and the engine serves on; a CUDA fault (no kernel can
    run after one) makes it refuse every request until restarted, with the reason. A CPU cannot fault
    like a GPU, so the real step is wrapped to raise the errors torch raises."""

    async def main() -> None:
        cfg = EngineConfig(model=str(tiny_moe_dir), device="cpu", dtype="float32", num_kv_blocks=64)
        engine = AsyncEngine(cfg)
        await engine.start()
        real_step, errors = engine.engine.step, []

        def failing_step(*args, **kwargs):
            if errors:
                raise errors.pop(0)
            return real_step(*args, **kwargs)

        engine.engine.step = failing_step
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        try:
            errors.append(RuntimeError("boom"))
            with pytest.raises(GenerationFailedError, match="boom"):
                [o async for o in engine.add_request("a", [1, 2, 3], params)]
            outs = [o async for o in engine.add_request("b", [1, 2, 3], params)]
            assert outs[-1].finish_reason == "length" and engine.dead_reason is None

            errors.append(RuntimeError("CUDA error: an illegal memory access was encountered"))
            with pytest.raises(GenerationFailedError):
                [o async for o in engine.add_request("c", [1, 2, 3], params)]
            assert "illegal memory access" in (engine.dead_reason or "")
            with pytest.raises(EngineDeadError):
                engine.add_request("d", [1, 2, 3], params)
        finally:
            await engine.shutdown()

    asyncio.run(main())
