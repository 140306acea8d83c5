"""Tensor / expert parallel on CPU (gloo): N processes serve exactly what one process serves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwenserve.config import EngineConfig
from qwenserve.distributed.parallel import MULTICAST_OFF_ENV, gloo_available
from qwenserve.distributed.sharding import (
    expert_range,
    head_ranges,
    local_routing,
    shard_param,
    validate_parallel,
)
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.engine.model_runner import kv_bytes_per_block
from qwenserve.engine.sampling_params import SamplingParams
from qwenserve.model import ops as ref_ops
from qwenserve.model.loader import build_model, load_model_config

pytestmark = pytest.mark.skipif(not gloo_available(), reason="torch.distributed gloo backend unavailable")

CPU = torch.device("cpu")
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=5)
LOGPROB_ATOL = 1e-4


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    lens = [5, 37, 12, 60, 23, 1]
    return [torch.randint(0, 500, (n,), generator=g).tolist() for n in lens]


def _engine(path: Path, world: int, **overrides) -> LLMEngine:
    # A 24-token budget splits the longer prompts into chunks that share steps with decodes.
    cfg = dict(model=str(path), device="cpu", dtype="float32", num_kv_blocks=128, max_num_batched_tokens=24,
               tensor_parallel_size=world)
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg))


def _generate(engine: LLMEngine) -> list:
    return [outs[0] for outs in engine.generate(_prompts(), GREEDY)]


@pytest.fixture(scope="module", params=[("moe", 2), ("dense", 2), ("moe", 4)], ids=["moe-2", "dense-2", "moe-4"])
def pair(request: pytest.FixtureRequest) -> tuple[list, list]:
    """(single-process outputs, N-process outputs) for one tiny checkpoint.

    4 ranks: fewer kv heads (2) than ranks, so each kv head is replicated on two ranks.
    """
    kind, world = request.param
    path = request.getfixturevalue(f"tiny_{kind}_dir")
    single = _generate(_engine(path, 1))
    engine = _engine(path, world)
    try:
        parallel = _generate(engine)
    finally:
        engine.close()  # only one process group per process: the next engine starts its own
    return single, parallel


def test_greedy_tokens_equal_single_process(pair: tuple[list, list]) -> None:
    single, parallel = pair
    assert [o.token_ids for o in parallel] == [o.token_ids for o in single]
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in parallel)


def test_logprobs_close_to_single_process(pair: tuple[list, list]) -> None:
    single, parallel = pair
    for one, many in zip(single, parallel, strict=True):
        for a, b in zip(one.logprobs, many.logprobs, strict=True):
            assert abs(a.logprob - b.logprob) <= LOGPROB_ATOL
            assert [t[0] for t in a.top_logprobs] == [t[0] for t in b.top_logprobs]
            assert max(abs(x[2] - y[2]) for x, y in zip(a.top_logprobs, b.top_logprobs, strict=True)) <= LOGPROB_ATOL


def test_failed_load_and_close_free_the_group(tiny_moe_dir: Path) -> None:
    # A load that fails after the workers started must stop them and hand back the process group.
    with pytest.raises(ValueError, match="max-model-len"):
        _engine(tiny_moe_dir, 2, num_kv_blocks=4, max_model_len=1024)
    engine = _engine(tiny_moe_dir, 2, num_kv_blocks=None, kv_cache_memory=4 << 20)
    procs = engine.workers.procs
    try:
        environ = Path(f"/proc/{procs[0].pid}/environ")
        if environ.exists():  # Linux: the worker was started with NVLink multicast off
            env = dict(kv.split("=", 1) for kv in environ.read_text().split("\0") if "=" in kv)
            assert {k: env.get(k) for k in MULTICAST_OFF_ENV} == MULTICAST_OFF_ENV
        # No exact pool given: each rank holds half the kv heads, so the same budget buys twice the blocks.
        one_rank = _engine(tiny_moe_dir, 1, num_kv_blocks=None, kv_cache_memory=4 << 20)
        assert engine.block_manager.num_usable_blocks + 1 == 2 * (one_rank.block_manager.num_usable_blocks + 1)
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        tokens = [e.generate([[1, 2, 3]], params)[0][0].token_ids for e in (engine, one_rank)]
        assert tokens[0] == tokens[1]
    finally:
        engine.close()
    assert all(not p.is_alive() for p in procs)


# -- sharding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_routing_sums_to_the_full_moe(world: int) -> None:
    g = torch.Generator().manual_seed(0)
    experts, hidden, inter, tokens, top_k = 8, 32, 16, 11, 2
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    weights, ids = torch.softmax(torch.randn(tokens, experts, generator=g), -1).topk(top_k)
    full = ref_ops.fused_moe(x, w13, w2, weights, ids)
    total = torch.zeros_like(full)
    for rank in range(world):
        mine = expert_range(experts, rank, world)
        local_weights, local_ids = local_routing(weights, ids, mine.start, len(mine))
        total += ref_ops.fused_moe(x, w13[mine.start : mine.stop], w2[mine.start : mine.stop], local_weights, local_ids)
    torch.testing.assert_close(total, full, atol=1e-5, rtol=1e-5)


def _reassemble(name: str, parts: list[torch.Tensor], cfg, world: int) -> torch.Tensor:
    """The full tensor from every rank's slice (kv heads replicated over ranks are taken once)."""
    d = cfg.head_dim
    if name.endswith("qkv_proj.weight"):
        qs, ks, vs = [], {}, {}
        for rank, part in enumerate(parts):
            q_heads, kv_heads = head_ranges(cfg.num_attention_heads, cfg.num_key_value_heads, rank, world)
            q, k, v = part.split([len(q_heads) * d, len(kv_heads) * d, len(kv_heads) * d])
            qs.append(q)
            ks[kv_heads.start], vs[kv_heads.start] = k, v
        return torch.cat(qs + [ks[i] for i in sorted(ks)] + [vs[i] for i in sorted(vs)])
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return torch.cat(parts, dim=1)
    if name.endswith("gate_up_proj.weight"):
        gates, ups = zip(*(p.chunk(2) for p in parts), strict=True)
        return torch.cat(gates + ups)
    if name.endswith(("mlp.w13", "mlp.w2")):
        return torch.cat(parts)
    for part in parts[1:]:
        assert torch.equal(part, parts[0]), f"{name} should be replicated"
    return parts[0]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("moe", [True, False], ids=["moe", "dense"])
@pytest.mark.parametrize("load_format", ["auto", "dummy"])
def test_rank_slices_reassemble_into_full_weights(
    tiny_moe_dir: Path, tiny_dense_dir: Path, world: int, moe: bool, load_format: str
) -> None:
    # world 4 has fewer kv heads (2) than ranks: each kv head lives on two ranks.
    path = tiny_moe_dir if moe else tiny_dense_dir
    cfg = load_model_config(path)
    full = dict(build_model(cfg, path, CPU, torch.float32, load_format).named_parameters())
    shards = [
        dict(build_model(cfg, path, CPU, torch.float32, load_format, rank=r, world_size=world).named_parameters())
        for r in range(world)
    ]
    assert set(shards[0]) == set(full)
    for name, weight in full.items():
        parts = [s[name] for s in shards]
        for rank, part in enumerate(parts):
            assert torch.equal(part, shard_param(name, weight, cfg, rank, world)), (name, rank)
        if name.endswith(("qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight", "mlp.w13")):
            assert parts[0].numel() < weight.numel(), f"{name} is not split"
        assert torch.equal(_reassemble(name, parts, cfg, world), weight), name


def test_kv_heads_and_pool_per_rank(tiny_moe_dir: Path) -> None:
    cfg = load_model_config(tiny_moe_dir)  # 4 q heads, 2 kv heads
    assert [head_ranges(4, 2, r, 2) for r in range(2)] == [(range(0, 2), range(0, 1)), (range(2, 4), range(1, 2))]
    assert [head_ranges(4, 2, r, 4)[1] for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    one = kv_bytes_per_block(cfg, 16, torch.float32)
    assert kv_bytes_per_block(cfg, 16, torch.float32, 2) * 2 == one
    assert kv_bytes_per_block(cfg, 16, torch.float32, 4) * 2 == one  # replicated: still one head per rank


def test_unsplittable_models_are_refused(tiny_moe_dir: Path) -> None:
    cfg = load_model_config(tiny_moe_dir)  # 4 heads, 2 kv heads, 8 experts
    validate_parallel(cfg, 1)
    validate_parallel(cfg, 4)
    with pytest.raises(ValueError, match="attention heads"):
        validate_parallel(cfg, 3)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)


def test_world_size_one_through_the_distributed_runner(tiny_moe_dir: Path) -> None:
    # Rank 0 alone in a gloo group: the pack -> broadcast -> unpack path feeds the model the same step.
    from qwenserve.distributed.parallel import free_port
    from qwenserve.distributed.worker import DistributedModelRunner, WorkerGroup, WorkerSpec
    from qwenserve.engine.model_runner import ModelRunner
    from qwenserve.engine.scheduler import ScheduledBatch
    from qwenserve.engine.sequence import Sequence

    cfg = load_model_config(tiny_moe_dir)
    spec = WorkerSpec(
        path=tiny_moe_dir, model_config=cfg, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}",
        device_type="cpu", first_device_index=0, dtype=torch.float32, load_format="auto", seed=0,
        max_positions=1024, block_size=16, use_kernels=False, num_threads=1,
    )
    workers = WorkerGroup(spec)
    try:
        runners = [
            ModelRunner(build_model(cfg, tiny_moe_dir, CPU, torch.float32), cfg, 16, 16, CPU, torch.float32),
            DistributedModelRunner(build_model(cfg, tiny_moe_dir, CPU, torch.float32), cfg, 16, 16, CPU,
                                   torch.float32, workers),
        ]
        tokens = []
        for runner in runners:
            seqs = [Sequence("r", i, list(range(i + 3, 40)), SamplingParams(temperature=0.0), seed=0) for i in range(3)]
            batch = ScheduledBatch()
            for i, seq in enumerate(seqs):
                seq.block_table = [1 + 3 * i, 2 + 3 * i, 3 + 3 * i]
                batch.add(seq, seq.num_prompt_tokens - 5 * i)  # some chunks end before the prompt does
            tokens.append(runner.execute(batch).token_ids)
        assert tokens[0] == tokens[1] and len(tokens[0]) == 1
    finally:
        workers.close()


def test_failure_inside_rank0_forward_stops_the_group(tiny_dense_dir: Path) -> None:
    # The worker is left inside an all_reduce: later steps must fail fast, and close must not wait on it.
    engine = _engine(tiny_dense_dir, 2)
    try:
        def boom(*_: object) -> None:
            raise RuntimeError("simulated failure")

        engine.model.layers[1].mlp.forward = boom
        with pytest.raises(RuntimeError, match="simulated failure"):
            engine.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=2))
        with pytest.raises(RuntimeError, match="out of step"):
            engine.runner.execute(engine.scheduler.schedule())
    finally:
        procs = engine.workers.procs
        engine.close()
    assert all(not p.is_alive() for p in procs)
