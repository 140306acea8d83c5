"""Pick the batch-1 MoE tiles inside the real decode graph rather than in isolation.

Usage on a GPU machine: python3 bench/tune_decode_moe.py CONFIG_DIR [--context 512]
The isolated sweep (bench/kernels.py --tune-moe) measures each GEMM alone with a cold L2, where
every batch-1 candidate lands on the same plateau. Here the full-size dummy model decodes one
sequence; for each candidate tile of GEMM1 (then GEMM2) the batch-1 CUDA graph is re-captured
and replayed back to back, so the figure is the whole step as the server runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import random

import torch

from qwenserve.config import EngineConfig
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.engine.sampling_params import SamplingParams
from qwenserve.kernels import moe, moe_configs

KEY = (128, 768, 2048, 8)
TILES = [(16, 128, 2, 4), (16, 256, 2, 3), (16, 128, 4, 4), (16, 256, 4, 4), (32, 128, 4, 4), (32, 128, 2, 4),
         (32, 256, 4, 3), (32, 64, 4, 5), (64, 128, 4, 4), (64, 64, 4, 5), (64, 256, 4, 3), (128, 64, 4, 4),
         (16, 512, 4, 2), (32, 512, 4, 2), (16, 64, 2, 6), (32, 64, 2, 6)]


def replay_ms(engine: LLMEngine, steps: int = 200) -> float:
    engine.runner.capture_graphs(1, engine.max_model_len)
    for _ in range(3):
        engine.step()  # loads real inputs into the new graph's buffers
    graph = engine.runner.graphs.graphs[1]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--context", type=int, default=512)
    args = p.parse_args()
    engine = LLMEngine(EngineConfig(model=args.config, load_format="dummy", max_model_len=4096, max_num_seqs=1))
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=100000, ignore_eos=True)
    engine.add_request("tune", [rng.randrange(150000) for _ in range(args.context)], params)
    for _ in range(4):
        engine.step()
    table = list(moe_configs._TABLES[KEY])
    base = table[0][1]
    results = []
    for which in ("gemm1", "gemm2"):
        for n, k, warps, stages in TILES:
            if which == "gemm1":
                cfg = dataclasses.replace(base, n1=n, k1=k, warps1=warps, stages1=stages)
            else:
                cfg = dataclasses.replace(base, n2=n, k2=k, warps2=warps, stages2=stages)
            moe_configs.set_moe_table(KEY, [(1, cfg)] + table[1:], moe_configs.GROUPED_MM_MIN_TOKENS)
            try:
                ms = replay_ms(engine)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for this tile
                print(which, (n, k, warps, stages), "failed", type(exc).__name__, flush=True)
                continue
            results.append((ms, which, (n, k, warps, stages)))
            print(f"{which} {(n, k, warps, stages)}: step {ms * 1000:.1f} us", flush=True)
    moe_configs.set_moe_table(KEY, table, moe_configs.GROUPED_MM_MIN_TOKENS)
    print(f"current {base}: step {replay_ms(engine) * 1000:.1f} us")
    default_warps = moe.ROUTE_ALIGN_NUM_WARPS
    for warps in (1, 2, 4, 8):
        moe.ROUTE_ALIGN_NUM_WARPS = warps
        print(f"route_align num_warps={warps}: step {replay_ms(engine) * 1000:.1f} us", flush=True)
    moe.ROUTE_ALIGN_NUM_WARPS = default_warps
    for which in ("gemm1", "gemm2"):
        best = sorted(r for r in results if r[1] == which)[:3]
        print("best", which, [(round(ms * 1000, 1), tile) for ms, _, tile in best])


if __name__ == "__main__":
    main()
