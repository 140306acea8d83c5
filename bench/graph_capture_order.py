"""Does a decode graph captured at engine start-up (before the warm-up prefills) replay slower than one
captured later? The full-size engine's start-up graph replayed ~210 us per step slower than a fresh capture
(docs/BENCHMARKS.md, eighth session); this asks the same of a model with fewer layers of the real shape.

Usage on a GPU machine: PYTHONPATH=. python3 bench/graph_capture_order.py CONFIG_DIR [--layers 8]
Prints, interleaved over rounds, the replay time of: the engine's start-up batch-1 graph and a graph captured
on the same engine after its warm-up; then each after a 1 s pause and sustained over ~2 s (whether a rested
GPU's boost explains the gap).
Run it with --layers 48 as well: the gap was measured on the full model.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from qwenserve.config import EngineConfig
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.engine.model_runner import DecodeGraphs
from qwenserve.engine.sampling_params import SamplingParams


def shrunk_config(config_dir: str, layers: int) -> str:
    """A copy of the config directory with `layers` decoder layers."""
    out = Path(tempfile.mkdtemp(prefix="qwenserve-shrunk-"))
    for f in Path(config_dir).iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    cfg = json.loads((out / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


def replay_us(graph: torch.cuda.CUDAGraph, steps: int = 200) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / steps


def decode(engine: LLMEngine, context: int, steps: int = 12) -> torch.cuda.CUDAGraph:
    """Start a greedy request, run `steps` engine steps; the batch-1 graph they replayed."""
    rng = random.Random(context)
    params = SamplingParams(temperature=0.0, max_tokens=100000, ignore_eos=True)
    engine.add_request(f"r{rng.random()}", [rng.randrange(150000) for _ in range(context)], params)
    for _ in range(steps):
        engine.step()
    graphs = engine.runner.graphs
    return graphs.graphs[graphs.last_key]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    common = dict(model=shrunk_config(args.config, args.layers), load_format="dummy", max_model_len=2560,
                  max_num_seqs=4, kv_cache_memory=4 << 30)  # fmt: skip
    engine = LLMEngine(EngineConfig(**common))
    graphs = {"start-up capture": decode(engine, args.context)}
    runner = engine.runner
    start_up = runner.graphs
    runner.graphs = DecodeGraphs(runner.model, 4, start_up.max_blocks, runner.block_size, runner.device)
    for _ in range(3):  # the same request on: its steps load the fresh graph's inputs
        engine.step()
    graphs["fresh capture, same engine"] = runner.graphs.graphs[runner.graphs.last_key]
    for _ in range(args.rounds):
        print({name: round(replay_us(g)) for name, g in graphs.items()}, flush=True)
    # Clocks: a GPU rested by a pause may replay faster for a while. Each graph after 1 s idle, then
    # each sustained for ~2 s in windows of 100 replays: if the start-up graph catches up once both
    # are warm, the gap is the GPU's boost, not the capture.
    for name, g in graphs.items():
        time.sleep(1.0)
        print(f"{name}, after 1 s idle: {replay_us(g):.0f} us", flush=True)
    for name, g in graphs.items():
        windows = [round(replay_us(g, 100)) for _ in range(8)]
        print(f"{name}, sustained windows: {windows}", flush=True)


if __name__ == "__main__":
    main()
