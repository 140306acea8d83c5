"""Pick the batch-1 MoE tiles inside the real decode graph rather than in isolation.

Usage on a GPU machine: python3 bench/tune_decode_moe.py CONFIG_DIR [--context 512] [--batch 1 2 4] [--full]
The isolated sweep (bench/kernels.py --tune-moe) measures each GEMM alone with a cold L2, where
every batch-1 candidate lands on the same plateau. Here the full-size dummy model decodes one
batch; for each candidate tile of GEMM1 (then GEMM2) the batch-1 CUDA graph is re-captured
and replayed back to back, so the figure is the whole step as the server runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import random

import torch

from qwenserve.config import EngineConfig
from qwenserve.engine.decode_graphs import DecodeGraphs
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.engine.sampling_params import SamplingParams
from qwenserve.kernels import moe, moe_configs

KEY = (128, 768, 2048, 8)
TILES = [(16, 128, 2, 4), (16, 256, 2, 3), (16, 128, 4, 4), (16, 256, 4, 4), (32, 128, 4, 4), (32, 128, 2, 4),
         (32, 256, 4, 3), (32, 64, 4, 5), (64, 128, 4, 4), (64, 64, 4, 5), (64, 256, 4, 3), (128, 64, 4, 4),
         (16, 512, 4, 2), (32, 512, 4, 2), (16, 64, 2, 6), (32, 64, 2, 6)]
QUICK_TILES1 = [(16, 128, 2, 4), (16, 256, 2, 3), (16, 128, 2, 5), (16, 64, 2, 6), (32, 128, 2, 4), (32, 256, 4, 3)]
QUICK_TILES2 = [(32, 64, 4, 5), (64, 64, 4, 5), (16, 128, 2, 4), (32, 128, 2, 4), (16, 64, 2, 6), (32, 128, 4, 4)]


def replay_ms(engine: LLMEngine, batch: int, steps: int = 100) -> float:
    runner = engine.runner
    runner.graphs = DecodeGraphs(runner.model, batch, -(-engine.max_model_len // runner.block_size),
                                 runner.block_size, runner.device)
    for _ in range(3):
        engine.step()  # loads real inputs into the new graph's buffers
    if runner.graphs.last_key is None:
        raise SystemExit(f"batch {batch}: the decode step did not run in a CUDA graph (are all its sequences "
                         "past their prefill and inside max_model_len?)")
    graph = runner.graphs.graphs[runner.graphs.last_key]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def start_batch(engine: LLMEngine, batch: int, context: int) -> None:
    """Replace whatever runs by `batch` fresh sequences of `context` tokens, past their prefill."""
    for rid in list(engine.requests):
        engine.abort(rid)
    rng = random.Random(batch)
    params = SamplingParams(temperature=0.0, max_tokens=100000, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"tune-{batch}-{i}", [rng.randrange(150000) for _ in range(context)], params)
    seqs = [seq for req in engine.requests.values() for seq in req.seqs]
    while any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in seqs):  # long prompts take many chunks
        engine.step()
    for _ in range(3):
        engine.step()


def tune_batch(engine: LLMEngine, batch: int, context: int, tiles1: list, tiles2: list) -> None:
    start_batch(engine, batch, context)
    table = list(moe_configs._device_tables()[KEY])
    row = next(i for i, (max_tokens, _) in enumerate(table) if max_tokens >= batch)
    base = table[row][1]
    results = []
    for which, tiles in (("gemm1", tiles1), ("gemm2", tiles2)):
        for n, k, warps, stages in tiles:
            if which == "gemm1":
                cfg = dataclasses.replace(base, n1=n, k1=k, warps1=warps, stages1=stages)
            else:
                cfg = dataclasses.replace(base, n2=n, k2=k, warps2=warps, stages2=stages)
            moe_configs.set_moe_table(KEY, table[:row] + [(table[row][0], cfg)] + table[row + 1 :],
                                      moe_configs.GROUPED_MM_MIN_TOKENS)
            try:
                ms = replay_ms(engine, batch)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for this tile
                print(batch, which, (n, k, warps, stages), "failed", type(exc).__name__, flush=True)
                continue
            results.append((ms, which, (n, k, warps, stages)))
            print(f"batch {batch} {which} {(n, k, warps, stages)}: step {ms * 1000:.1f} us", flush=True)
    moe_configs.set_moe_table(KEY, table, moe_configs.GROUPED_MM_MIN_TOKENS)
    print(f"batch {batch} current {base}: step {replay_ms(engine, batch) * 1000:.1f} us")
    if batch <= moe.ROUTE_ALIGN_MAX_TOKENS:
        default_warps = dict(moe.ROUTE_ALIGN_NUM_WARPS)
        for warps in (1, 2, 4):
            moe.ROUTE_ALIGN_NUM_WARPS = dict.fromkeys(range(1, moe.ROUTE_ALIGN_MAX_TOKENS + 1), warps)
            print(f"batch {batch} route_align num_warps={warps}: step {replay_ms(engine, batch) * 1000:.1f} us")
        moe.ROUTE_ALIGN_NUM_WARPS = default_warps
    for which in ("gemm1", "gemm2"):
        best = sorted(r for r in results if r[1] == which)[:3]
        print(f"batch {batch} best {which}", [(round(ms * 1000, 1), tile) for ms, _, tile in best], flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--batch", type=int, nargs="*", default=[1])
    p.add_argument("--full", action="store_true", help="every candidate tile (default: the likely ones)")
    args = p.parse_args()
    engine = LLMEngine(EngineConfig(model=args.config, load_format="dummy", max_model_len=4096,
                                    max_num_seqs=max(args.batch)))
    tiles1 = TILES if args.full else QUICK_TILES1
    tiles2 = TILES if args.full else QUICK_TILES2
    for batch in args.batch:
        tune_batch(engine, batch, args.context, tiles1, tiles2)


if __name__ == "__main__":
    main()
