"""The engine's scheduling never changes what a request generates."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from qwenserve.config import EngineConfig
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.engine.sampling_params import InvalidRequestError, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def make_engine(path: Path, **overrides) -> LLMEngine:
    cfg = dict(model=str(path), device="cpu", dtype="float32", num_kv_blocks=256, max_num_batched_tokens=512)
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg))


def prompts(count: int, seed: int = 0, lo: int = 5, hi: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 500) for _ in range(rng.randrange(lo, hi))] for _ in range(count)]


def tokens_of(engine: LLMEngine, batch: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [outs[0].token_ids for outs in engine.generate(batch, params)]


@pytest.fixture(scope="module")
def engine(tiny_moe_dir: Path) -> LLMEngine:
    return make_engine(tiny_moe_dir)


@pytest.fixture(scope="module")
def alone(engine: LLMEngine) -> dict[int, list[int]]:
    """Reference: every test prompt generated on its own, with the prefix cache off."""
    ref = make_engine(engine.model_info.path, enable_prefix_caching=False)
    return {i: tokens_of(ref, [p])[0] for i, p in enumerate(prompts(12))}


def test_batched_equals_alone(engine: LLMEngine, alone: dict[int, list[int]]) -> None:
    assert tokens_of(engine, prompts(12)) == [alone[i] for i in range(12)]


def test_chunked_prefill_equals_alone(tiny_moe_dir: Path, alone: dict[int, list[int]]) -> None:
    small_budget = make_engine(tiny_moe_dir, max_num_batched_tokens=7)
    assert tokens_of(small_budget, prompts(12)) == [alone[i] for i in range(12)]


def test_preemption_recomputes_identically(tiny_moe_dir: Path, alone: dict[int, list[int]]) -> None:
    # 12 sequences of up to ~100 tokens need far more than 20 blocks of 16: the newest get preempted.
    tight = make_engine(tiny_moe_dir, num_kv_blocks=20)
    outs = tokens_of(tight, prompts(12))
    assert outs == [alone[i] for i in range(12)]
    assert tight.scheduler.num_preemptions > 0
    assert tight.block_manager.num_free_blocks == tight.block_manager.num_usable_blocks


def test_prefix_cache_hit_reports_cached_tokens_and_keeps_output(engine: LLMEngine) -> None:
    shared = prompts(1, seed=7, lo=80, hi=81)[0]
    first = engine.generate([shared + [1, 2, 3]], GREEDY)[0][0]
    second = engine.generate([shared + [4, 5, 6]], GREEDY)[0][0]
    fresh = make_engine(engine.model_info.path, enable_prefix_caching=False)
    assert second.num_cached_tokens == (len(shared) // 16) * 16 > 0
    assert first.num_cached_tokens == 0 or first.num_cached_tokens % 16 == 0
    assert second.token_ids == tokens_of(fresh, [shared + [4, 5, 6]])[0]
    # The very same prompt again is cached up to its last full block (one token is always computed).
    again = engine.generate([shared + [1, 2, 3]], GREEDY)[0][0]
    assert again.num_cached_tokens == ((len(shared) + 3 - 1) // 16) * 16
    assert again.token_ids == first.token_ids


def test_blocks_recomputed_after_preemption_are_cached_again() -> None:
    """A preempted sequence whose cached blocks were evicted recomputes them: they rejoin the prefix cache."""
    from qwenserve.engine.block_manager import BlockManager
    from qwenserve.engine.sequence import Sequence

    bm = BlockManager(num_blocks=8, block_size=4)
    seq = Sequence("r", 0, list(range(100, 113)), GREEDY, seed=0)  # 13 tokens: 3 full blocks

    def compute() -> None:
        bm.allocate_cached_prefix(seq)
        assert bm.ensure_capacity(seq, 13)
        seq.num_computed_tokens = 13
        bm.commit_full_blocks(seq)

    compute()
    assert len(bm.hash_to_block) == 3
    bm.free(seq)  # preempted
    other = Sequence("o", 0, [1], GREEDY, seed=0)
    assert bm.ensure_capacity(other, 4 * bm.num_usable_blocks)  # takes every block: the cache is evicted
    assert not bm.hash_to_block
    bm.free(other)
    compute()  # re-admitted: nothing cached, everything recomputed
    assert sorted(bm.hash_to_block.values()) == sorted(seq.block_table[:3]), "recomputed blocks must be cached"


def test_eviction_under_pressure_never_changes_outputs(tiny_moe_dir: Path, alone: dict[int, list[int]]) -> None:
    small = make_engine(tiny_moe_dir, num_kv_blocks=24)
    for round_ in range(3):  # each round evicts cached blocks of the previous ones
        got = tokens_of(small, prompts(12))
        assert got == [alone[i] for i in range(12)], f"round {round_}"
    assert small.block_manager.num_evictions > 0


def test_abort_frees_blocks_at_once(engine: LLMEngine) -> None:
    bm = engine.block_manager
    engine.add_request("to-abort", prompts(1, seed=3, lo=60, hi=61)[0], SamplingParams(max_tokens=50))
    engine.step()
    assert bm.num_free_blocks < bm.num_usable_blocks
    outs = engine.abort("to-abort")
    assert [o.finish_reason for o in outs] == ["abort"]
    assert bm.num_free_blocks == bm.num_usable_blocks
    assert not engine.has_unfinished()


def test_stats_seen_once_scheduled_count_the_step_in_flight(engine: LLMEngine) -> None:
    """What /metrics shows during a step (the async engine samples stats() at on_scheduled): the
    request being prefilled is running and holds its blocks, not waiting with none."""
    bm = engine.block_manager
    engine.add_request("prefilling", prompts(1, seed=4, lo=80, hi=81)[0], SamplingParams(max_tokens=2))
    before = engine.stats()
    assert (before.num_running, before.num_waiting) == (0, 1)
    seen = []
    engine.step(on_scheduled=lambda: seen.append(engine.stats()))
    (during,) = seen
    assert (during.num_running, during.num_waiting) == (1, 0)
    assert during.num_free_blocks < bm.num_usable_blocks and during.kv_cache_usage > 0
    engine.abort("prefilling")
    engine.add_request("three", prompts(1, seed=5)[0], SamplingParams(max_tokens=4, n=3, temperature=1.0))
    for _ in range(3):
        engine.step()
    assert engine.stats().num_running == 1  # a request, however many choices it has
    engine.abort("three")


def test_hundred_concurrent_requests_match_alone(tiny_moe_dir: Path) -> None:
    many = prompts(100, seed=11, lo=3, hi=40)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    eng = make_engine(tiny_moe_dir, num_kv_blocks=128, max_num_seqs=32)
    together = tokens_of(eng, many, params)
    solo_engine = make_engine(tiny_moe_dir, enable_prefix_caching=False)
    for i in range(0, 100, 9):
        assert together[i] == tokens_of(solo_engine, [many[i]], params)[0]
    assert all(len(t) == 4 for t in together)


def test_seed_reproducible_alone_and_in_batch(engine: LLMEngine) -> None:
    p = prompts(1, seed=5)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    a = engine.generate([p], seeded)[0][0].token_ids
    b = engine.generate([p], seeded)[0][0].token_ids
    others = prompts(5, seed=9)
    mixed = engine.generate([others[0], p, others[1]], [GREEDY, seeded, SamplingParams(temperature=0.8, max_tokens=16)])
    assert a == b == mixed[1][0].token_ids
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=16, ignore_eos=True)
    assert engine.generate([p], other_seed)[0][0].token_ids != a


def test_max_tokens_gives_length(engine: LLMEngine) -> None:
    out = engine.generate([prompts(1)[0]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0][0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_stop_string_ends_with_stop_and_is_not_emitted(engine: LLMEngine) -> None:
    p = prompts(1, seed=21)[0]
    full = engine.generate([p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0][0]
    assert len(full.text) > 4
    stop = full.text[3:5]
    out = engine.generate([p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))[0][0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.index(stop)]


def test_stop_token_ids_and_eos(engine: LLMEngine) -> None:
    p = prompts(1, seed=21)[0]
    full = engine.generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0][0]
    target = full.token_ids[3]
    out = engine.generate([p], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[target]))[0][0]
    assert out.finish_reason == "stop" and out.stop_reason == target
    assert out.token_ids == full.token_ids[: full.token_ids.index(target) + 1]


def test_min_tokens_masks_stop_tokens(engine: LLMEngine) -> None:
    """Before min_tokens the stop token cannot be sampled (the first tokens change where greedy
    would have picked it); the output then runs on and may stop on it from min_tokens on."""
    p = prompts(1, seed=21)[0]
    full = engine.generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0][0]
    target = full.token_ids[1]
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[target], min_tokens=6, logprobs=0)
    out = engine.generate([p], params)[0][0]
    assert target not in out.token_ids[:6] and out.token_ids[0] == full.token_ids[0]
    assert len(out.token_ids) >= 6 and len(out.logprobs) == len(out.token_ids)
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == target and target not in out.token_ids[:-1]


def test_n_choices_share_the_prompt(engine: LLMEngine) -> None:
    p = prompts(1, seed=31, lo=70, hi=71)[0]
    params = SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=6, ignore_eos=True)
    engine.add_request("share", p, params)
    seqs = engine.requests["share"].seqs
    while not all(s.num_computed_tokens >= len(p) for s in seqs):
        engine.step()
    assert all(s.block_table[:4] == seqs[0].block_table[:4] for s in seqs[1:])  # the prompt's 4 full blocks
    while engine.has_unfinished():
        engine.step()
    outs = engine.generate([p], params)[0]
    assert [o.index for o in outs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in outs}) > 1
    # Sharing choice 0's blocks is no cache hit: a new prompt reports none, a repeated one its cached prefix.
    fresh = engine.generate([prompts(1, seed=32, lo=70, hi=71)[0]], params)[0]
    assert [o.num_cached_tokens for o in fresh] == [0, 0, 0]
    assert outs[0].num_cached_tokens == 64 and max(o.num_cached_tokens for o in outs) == 64


def test_prompt_that_can_never_fit_is_refused(tiny_moe_dir: Path) -> None:
    eng = make_engine(tiny_moe_dir, num_kv_blocks=8)  # 7 usable blocks = 112 tokens
    assert eng.max_model_len == 112
    with pytest.raises(InvalidRequestError, match="context length is 112 tokens.*resulted in 200 tokens"):
        eng.add_request("long", list(range(200)), GREEDY)


def test_logprobs(engine: LLMEngine) -> None:
    out = engine.generate([prompts(1)[0]], SamplingParams(temperature=0, max_tokens=3, logprobs=5))[0][0]
    assert len(out.logprobs) == 3
    for lp in out.logprobs:
        assert len(lp.top_logprobs) == 5
        assert lp.top_logprobs[0][0] == lp.token_id  # greedy picks the most likely token
        assert lp.logprob == pytest.approx(lp.top_logprobs[0][2])


def test_penalties_are_batch_independent_and_bite(engine: LLMEngine) -> None:
    """Incremental penalty state must give what a request gets alone, and must change greedy output."""
    p = prompts(1, seed=41)[0]
    pen = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.8,
                         frequency_penalty=1.5, presence_penalty=1.0)
    alone_out = engine.generate([p], pen)[0][0].token_ids
    batch = engine.generate([prompts(1, seed=42)[0], p], [GREEDY, pen])[1][0].token_ids
    plain = engine.generate([p], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0][0].token_ids
    assert alone_out == batch
    assert alone_out != plain
    assert len(set(alone_out)) >= len(set(plain))
    assert not engine.runner.penalties.row_of  # rows are released when sequences finish


def test_warmup_leaves_the_engine_clean(tiny_moe_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU start-up warm-up (run here on CPU, from inside loading as on a GPU) must leave no
    request, block or cache entry behind."""
    real_load = LLMEngine._load

    def load_then_warm(self: LLMEngine) -> None:
        real_load(self)
        self._warmup()

    monkeypatch.setattr(LLMEngine, "_load", load_then_warm)
    eng = make_engine(tiny_moe_dir, max_num_batched_tokens=128)
    monkeypatch.undo()
    bm = eng.block_manager
    assert not eng.has_unfinished()
    assert bm.num_free_blocks == bm.num_usable_blocks and bm.num_cached_blocks == 0
    assert tokens_of(eng, prompts(2)) == tokens_of(make_engine(tiny_moe_dir), prompts(2))


def test_overlapped_steps_give_what_one_step_at_a_time_gives(tiny_moe_dir: Path) -> None:
    """Launching step N+1 before step N's tokens reach the host must change nothing a client sees:
    tokens, text, logprobs, finish reasons and counts, through preemption, stops and n > 1."""
    batch = prompts(10, seed=17, lo=20, hi=70)
    probe = make_engine(tiny_moe_dir, async_scheduling=False)
    greedy = tokens_of(probe, batch[:2], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    params = [
        GREEDY,
        SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[greedy[1][2]]),  # stops on its 3rd token
        SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=14, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=7, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=8, max_tokens=11, ignore_eos=True, presence_penalty=1.0),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=["a"]),
        GREEDY,
        SamplingParams(temperature=0, max_tokens=5, stop_token_ids=[greedy[0][0]]),  # stops on its 1st token
    ]

    def run(async_scheduling: bool) -> tuple[list, LLMEngine]:
        eng = make_engine(tiny_moe_dir, num_kv_blocks=24, max_num_batched_tokens=64, async_scheduling=async_scheduling)
        outs = eng.generate(batch, params)
        flat = [
            (o.token_ids, o.text, o.finish_reason, o.stop_reason, o.num_generated_tokens,
             [(lp.token_id, round(lp.logprob, 4)) for lp in o.logprobs or []])
            for choices in outs for o in choices
        ]
        return flat, eng

    one_at_a_time, _ = run(False)
    overlapped, eng = run(True)
    assert overlapped == one_at_a_time
    assert eng.scheduler.num_preemptions > 0
    assert one_at_a_time[1][2] == "stop" and len(one_at_a_time[1][0]) == 3
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_usable_blocks
    assert all(o[4] == len(o[0]) for o in overlapped)


def test_abort_while_a_step_is_in_flight(tiny_moe_dir: Path, alone: dict[int, list[int]]) -> None:
    """Aborting a request whose next step is already launched frees its blocks at once; the extra
    token it computes is dropped, and the other requests are untouched."""
    eng = make_engine(tiny_moe_dir)
    batch = prompts(12)
    for i in (0, 1, 2):
        eng.add_request(f"r{i}", batch[i], GREEDY)
    got: dict[str, list[int]] = {"r0": [], "r2": []}
    for _ in range(4):
        for out in eng.step():
            if out.request_id in got:
                got[out.request_id] += out.token_ids
    assert eng._in_flight is not None and any(s.request_id == "r1" for s in eng._in_flight.seqs)
    assert [o.finish_reason for o in eng.abort("r1")] == ["abort"]
    while eng.has_unfinished():
        for out in eng.step():
            assert out.request_id != "r1"
            got[out.request_id] += out.token_ids
    assert got == {"r0": alone[0], "r2": alone[2]}
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks


def test_overlapped_steps_launch_nothing_after_a_certain_stop(tiny_moe_dir: Path) -> None:
    """A sequence whose in-flight token will end it (max_tokens, or the context full) is not given
    another step: overlapping costs no extra launches, and it stops with 'length' as in lockstep."""
    prompt = prompts(1, seed=13, lo=100, hi=101)[0]
    outs, launches = [], []
    for async_scheduling in (False, True):
        eng = make_engine(tiny_moe_dir, num_kv_blocks=8, async_scheduling=async_scheduling)  # 112-token context
        real_launch, count = eng.runner.launch, [0]

        def counting_launch(batch, real_launch=real_launch, count=count):
            count[0] += 1
            return real_launch(batch)

        eng.runner.launch = counting_launch
        out = eng.generate([prompt], SamplingParams(temperature=0, ignore_eos=True))[0][0]
        assert out.finish_reason == "length" and len(prompt) + len(out.token_ids) == eng.max_model_len == 112
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_usable_blocks
        outs.append(out.token_ids)
        launches.append(count[0])
    assert outs[0] == outs[1]
    assert launches[0] == launches[1] == 12  # one prefill, eleven decodes


def test_penalised_request_joining_a_running_greedy_one(engine: LLMEngine) -> None:
    """A request with penalties joins one that has been decoding without them (its last token still
    in flight): both keep giving what they give alone."""
    a, b = prompts(2, seed=43)
    pen = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.8)
    a_alone = engine.generate([a], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0][0].token_ids
    b_alone = engine.generate([b], pen)[0][0].token_ids
    engine.add_request("a", a, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    got: dict[str, list[int]] = {"a": [], "b": []}

    def step() -> None:
        for out in engine.step():
            got[out.request_id] += out.token_ids

    for _ in range(6):
        step()
    engine.add_request("b", b, pen)
    step()
    step()
    assert len(engine.runner.penalties.row_of) == 1  # b's row only: a, without penalties, shares a scratch row
    while engine.has_unfinished():
        step()
    assert got == {"a": a_alone, "b": b_alone}



def test_prompt_logprobs_are_transformers_and_survive_chunks_cache_and_preemption(tiny_moe_dir: Path) -> None:
    """Every prompt token's logprob (the first one None) equals Transformers' log-softmax over the same
    weights, whether the prefill ran in one step or in chunks, with the prompt already in the prefix
    cache (it is recomputed: cached blocks carry no logits), or recomputed after a preemption."""
    import torch
    from transformers import AutoModelForCausalLM

    prompt = prompts(1, seed=7, lo=60, hi=61)[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logp = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    expected = [logp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]

    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    engine = make_engine(tiny_moe_dir)
    engine.generate([prompt], SamplingParams(temperature=0, max_tokens=1))  # puts the prompt in the cache
    out = engine.generate([prompt], params)[0][0]
    assert out.num_cached_tokens == 0 and out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for lp in out.prompt_logprobs[1:]:
        assert len(lp.top_logprobs) == 3 and lp.top_logprobs[0][2] >= lp.logprob - 1e-5
        assert lp.top_logprobs[0][2] >= lp.top_logprobs[1][2] >= lp.top_logprobs[2][2]
    chunked = make_engine(tiny_moe_dir, max_num_batched_tokens=7).generate([prompt], params)[0][0]
    tight = make_engine(tiny_moe_dir, num_kv_blocks=8)
    crowd = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)] * 6
    preempted = tight.generate([*prompts(6, seed=3, lo=40, hi=60), prompt], [*crowd, params])[-1][0]
    assert tight.scheduler.num_preemptions > 0
    for result in (out, chunked, preempted):
        assert [lp.token_id for lp in result.prompt_logprobs[1:]] == prompt[1:]
        assert [lp.logprob for lp in result.prompt_logprobs[1:]] == pytest.approx(expected, abs=1e-4)


def test_concurrent_requests_compute_a_shared_prefix_once(tiny_moe_dir: Path) -> None:
    """Two prompts sharing 96 tokens arrive together, with room for both in one step: the second waits
    for the first's blocks and reads them from the cache, and generates what it would alone."""
    eng = make_engine(tiny_moe_dir)
    shared = prompts(1, seed=41, lo=100, hi=101)[0]
    batch = [shared + [1, 2, 3], shared + [4, 5, 6, 7], prompts(1, seed=42, lo=50, hi=51)[0]]
    outs = [o[0] for o in eng.generate(batch, GREEDY)]
    assert [o.num_cached_tokens for o in outs] == [0, 96, 0]
    fresh = make_engine(tiny_moe_dir, enable_prefix_caching=False)
    assert [o.token_ids for o in outs] == tokens_of(fresh, batch)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_usable_blocks


def test_a_follower_waiting_on_an_aborted_leader_still_completes(tiny_moe_dir: Path) -> None:
    """The follower waits one step for the leader's prefix; the leader is aborted right after computing it:
    the follower reads what was computed from the cache and generates what it would alone."""
    eng = make_engine(tiny_moe_dir)
    shared = prompts(1, seed=43, lo=100, hi=101)[0]
    eng.add_request("leader", shared + [1], GREEDY)
    eng.add_request("follower", shared + [2], GREEDY)
    eng.step()
    follower = eng.requests["follower"].seqs[0]
    assert not follower.admitted  # waiting for the leader's blocks: the budget had room for both
    eng.abort("leader")
    token_ids, cached = [], None
    while eng.has_unfinished():
        for out in eng.step():
            token_ids += out.token_ids
            cached = out.num_cached_tokens
    fresh = make_engine(tiny_moe_dir, enable_prefix_caching=False)
    assert [token_ids] == tokens_of(fresh, [shared + [2]])
    assert cached == 96
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_usable_blocks


def test_a_waiting_follower_keeps_its_place_in_the_queue(tiny_moe_dir: Path) -> None:
    """A request waiting for a shared block is admitted before a long prompt sent after it, not behind
    that prompt's whole prefill (which, once running, would take the budget first)."""
    eng = make_engine(tiny_moe_dir, max_num_batched_tokens=64)
    shared = prompts(1, seed=44, lo=48, hi=49)[0]
    eng.add_request("leader", shared + [1], GREEDY)
    eng.add_request("follower", shared + [2], GREEDY)
    eng.add_request("later", prompts(1, seed=45, lo=600, hi=601)[0], GREEDY)
    seqs = {rid: eng.requests[rid].seqs[0] for rid in ("follower", "later")}
    admitted_at: dict[str, int] = {}
    step = 0
    while eng.has_unfinished():
        eng.step()
        step += 1
        admitted_at.update({rid: step for rid, seq in seqs.items() if seq.admitted and rid not in admitted_at})
    assert admitted_at["follower"] <= admitted_at["later"] == 2, admitted_at
    assert seqs["follower"].num_cached_tokens == 48


def test_step_token_budget_defaults_to_2048_on_a_cpu(tiny_moe_dir: Path) -> None:
    """A CPU prefills a long prompt in chunks of 2048 tokens (each takes seconds there: an abort or another
    session's turn waits for one chunk, not 8192 tokens' worth); a budget given is kept."""
    assert make_engine(tiny_moe_dir, max_num_batched_tokens=None).scheduler.max_num_batched_tokens == 2048
    assert make_engine(tiny_moe_dir, max_num_batched_tokens=300).scheduler.max_num_batched_tokens == 300
