"""What the first concurrent streams after a start cost: streams that join one step apart, as over HTTP.

    python3 bench/first_streams.py CONFIG_DIR [--streams 16 64]

On dummy weights, each round adds one request per engine step (15-token prompt, the model's sampling, so
top-k 20 with a repetition penalty, as qwen-code gets) until all have joined, then steps to the end. Every
round is run twice: the first meets whatever the engine still builds on first use (sampler CUDA graphs per
decode batch size, penalty rows), the second shows the warm cost. Prints the slowest time to first token,
the slowest step, and each sampler-graph capture with its time. Measured on an H200 (twenty-ninth session):
each capture took 1.4-2.8 ms, the first round of 16 / 64 streams 66 / 123 ms slowest TTFT against 104 / 74 ms
warm, so building the sampler graphs on first use costs nothing a client notices (docs/BENCHMARKS.md)."""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import torch

from qwenserve.bench import model_sampling, random_prompt
from qwenserve.config import EngineConfig
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.engine.sampler_graphs import SamplerGraphs
from qwenserve.engine.sampling_params import SamplingParams

CAPTURES: list[tuple[str, float]] = []


def time_captures() -> None:
    """Record each sampler-graph capture (key and milliseconds, the GPU drained before and after)."""
    capture = SamplerGraphs._capture

    def timed(self: SamplerGraphs, logits: torch.Tensor, mode: Any) -> torch.cuda.CUDAGraph:
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph = capture(self, logits, mode)
        torch.cuda.synchronize()
        CAPTURES.append((f"rows {logits.shape[0]} {mode}", (time.perf_counter() - start) * 1000))
        return graph

    SamplerGraphs._capture = timed  # type: ignore[method-assign]


def staggered(engine: LLMEngine, streams: int, sampling: dict[str, Any], rng: random.Random) -> tuple[float, float]:
    """Add one request per step until `streams` have joined, then finish them all; (slowest time to
    first token, slowest step), in seconds."""
    params = SamplingParams(**sampling, max_tokens=48, ignore_eos=True)
    added: dict[str, float] = {}
    first: dict[str, float] = {}
    slowest_step = 0.0
    while len(added) < streams or engine.has_unfinished():
        if len(added) < streams:
            request_id = f"r{time.monotonic_ns()}"
            added[request_id] = time.perf_counter()
            engine.add_request(request_id, random_prompt(15, rng), params)
        start = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        slowest_step = max(slowest_step, now - start)
        for out in outputs:
            if out.token_ids and out.request_id not in first:
                first[out.request_id] = now - added[out.request_id]
    return max(first.values()), slowest_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="model config directory (dummy weights)")
    parser.add_argument("--streams", type=int, nargs="+", default=[16, 64])
    args = parser.parse_args()
    time_captures()
    engine = LLMEngine(EngineConfig(model=str(args.config), load_format="dummy", max_model_len=40000))
    print(f"after start: {len(CAPTURES)} sampler graphs captured, {sum(ms for _, ms in CAPTURES):.1f} ms", flush=True)
    sampling = model_sampling(args.config)
    rng = random.Random(0)
    for streams in args.streams:
        for label in ("first", "again"):
            CAPTURES.clear()
            ttft, step = staggered(engine, streams, sampling, rng)
            captured = sum(ms for _, ms in CAPTURES)
            print(f"{streams:3d} streams, {label:5s}: slowest ttft {ttft * 1000:7.1f} ms, slowest step {step * 1000:7.1f} ms, "
                  f"{len(CAPTURES)} sampler graphs captured in {captured:.1f} ms", flush=True)
            for key, ms in CAPTURES:
                print(f"    {ms:7.1f} ms  {key}")


if __name__ == "__main__":
    main()
