"""The distributed path on one GPU: an NCCL group of world size 1, and expert-parallel routing
through the Triton MoE. Multi-GPU runs (world size 2, 4) need a multi-GPU machine and are
not part of this file.

Run on the device with `python3 -m pytest -q tests/gpu`; skipped on machines without CUDA.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

from qwenserve.distributed import parallel  # noqa: E402
from qwenserve.distributed.sharding import expert_range, local_routing  # noqa: E402
from qwenserve.engine.model_runner import ModelRunner  # noqa: E402
from qwenserve.engine.sampling_params import SamplingParams  # noqa: E402
from qwenserve.engine.scheduler import ScheduledBatch  # noqa: E402
from qwenserve.engine.sequence import Sequence  # noqa: E402
from qwenserve.model.loader import build_model, load_model_config  # noqa: E402

DEV = torch.device("cuda", 0)


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_routing_with_the_triton_moe(world: int) -> None:
    pytest.importorskip("triton")
    from qwenserve.kernels.moe import fused_moe
    from qwenserve.model import ops as ref_ops

    g = torch.Generator(device=DEV).manual_seed(0)
    experts, hidden, inter, tokens, top_k = 16, 256, 128, 37, 4
    x = torch.randn(tokens, hidden, generator=g, device=DEV, dtype=torch.bfloat16)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g, device=DEV) / hidden**0.5).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, generator=g, device=DEV) / inter**0.5).bfloat16()
    weights, ids = torch.softmax(torch.randn(tokens, experts, generator=g, device=DEV), -1).topk(top_k)
    full = ref_ops.fused_moe(x.float(), w13.float(), w2.float(), weights, ids)
    total = torch.zeros_like(full)
    for rank in range(world):
        mine = expert_range(experts, rank, world)
        local_weights, local_ids = local_routing(weights, ids, mine.start, len(mine))
        total += fused_moe(
            x, w13[mine.start : mine.stop], w2[mine.start : mine.stop], local_weights, local_ids
        ).float()
    assert ((total - full).norm() / full.norm()).item() < 1.5e-2


def _first_token(runner: ModelRunner, prompt: list[int]) -> int:
    seq = Sequence("smoke", 0, prompt, SamplingParams(temperature=0.0), seed=0)
    seq.block_table = list(range(1, 1 + -(-len(prompt) // 16)))
    batch = ScheduledBatch()
    batch.add(seq, len(prompt))
    return runner.execute(batch).token_ids[0]


def test_world_size_one_through_nccl_matches_plain_runner(tiny_moe_dir: Path) -> None:
    from qwenserve.distributed.worker import DistributedModelRunner, WorkerGroup, WorkerSpec

    cfg = load_model_config(tiny_moe_dir)
    spec = WorkerSpec(
        path=tiny_moe_dir,
        model_config=cfg,
        world_size=1,
        init_method=f"tcp://127.0.0.1:{parallel.free_port()}",
        device_type="cuda",
        first_device_index=0,
        dtype=torch.float32,
        load_format="auto",
        seed=0,
        max_positions=1024,
        block_size=16,
        use_kernels=False,
        num_threads=1,
    )
    workers = WorkerGroup(spec)  # world size 1: no worker processes, rank 0 alone in an NCCL group
    try:
        for key, value in parallel.MULTICAST_OFF_ENV.items():
            assert os.environ[key] == value
        t = torch.ones(4, device=DEV)
        torch.distributed.all_reduce(t)
        assert t.tolist() == [1.0] * 4
        plain = ModelRunner(
            build_model(cfg, tiny_moe_dir, DEV, torch.float32), cfg, 16, 16, DEV, torch.float32
        )
        dist_model = build_model(cfg, tiny_moe_dir, DEV, torch.float32)
        distributed = DistributedModelRunner(dist_model, cfg, 16, 16, DEV, torch.float32, workers)
        prompt = list(range(3, 60))
        assert _first_token(distributed, prompt) == _first_token(plain, prompt)
    finally:
        workers.close()



@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("use_kernels", [False, True], ids=["torch-fp32", "kernels-bf16"])
def test_two_gpus_over_nccl_match_one(tiny_moe_dir: Path, use_kernels: bool) -> None:
    """Tensor + expert parallel over NCCL on 2 GPUs gives one GPU's greedy tokens exactly with the float32
    torch ops; with the bf16 kernels (other summation order) the first token's logprob agrees closely."""
    from qwenserve.config import EngineConfig
    from qwenserve.engine.llm_engine import LLMEngine

    prompts = [list(range(3, 3 + n)) for n in (5, 40, 130)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
    dtype = "bfloat16" if use_kernels else "float32"
    outs = []
    for world in (1, 2):
        eng = LLMEngine(EngineConfig(model=str(tiny_moe_dir), device="cuda", dtype=dtype, num_kv_blocks=256,
                                     max_num_batched_tokens=64, tensor_parallel_size=world, use_kernels=use_kernels))
        try:
            outs.append([o[0] for o in eng.generate(prompts, params)])
        finally:
            eng.close()
    one, two = outs
    if not use_kernels:
        assert [o.token_ids for o in one] == [o.token_ids for o in two]
    for a, b in zip(one, two, strict=True):
        assert len(b.token_ids) == 12
        assert a.logprobs[0].logprob == pytest.approx(b.logprobs[0].logprob, abs=0.05)
