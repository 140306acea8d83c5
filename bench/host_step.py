"""Is batch-1 decode bound by the GPU or by the host's Python? Times one engine's steps both ways.

Usage on a GPU machine: PYTHONPATH=. python3 bench/host_step.py CONFIG_DIR [--context 512] [--tokens 256] [--profile]
Per step it prints the medians of: the GPU's period (an event recorded after each launch, so
the time between two is what the GPU spent on a step, bubbles included), the host's busy time
(step() minus the time collect() waited for the GPU) and its parts (launch, wait). A host busy
time near the GPU period means the host is the bound: the GPU idles between steps.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from qwenserve.config import EngineConfig
from qwenserve.engine.decode_graphs import DecodeGraphs
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.engine.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from ab_decode import parse_variant  # noqa: E402


def timed_decode(engine: LLMEngine, context: int, tokens: int, params: SamplingParams) -> dict[str, float]:
    """Decode `tokens` after a `context`-token prompt; medians in microseconds."""
    runner = engine.runner
    waits: list[float] = []
    launches: list[float] = []
    events: list[torch.cuda.Event] = []
    collect, launch = runner.collect, runner.launch

    def timed_collect(step):  # noqa: ANN001, ANN202
        t = time.perf_counter()
        out = collect(step)
        waits.append(time.perf_counter() - t)
        return out

    def timed_launch(batch):  # noqa: ANN001, ANN202
        t = time.perf_counter()
        out = launch(batch)
        launches.append(time.perf_counter() - t)
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        events.append(ev)
        return out

    runner.collect, runner.launch = timed_collect, timed_launch
    rng = random.Random(0)
    engine.add_request("host-step", [rng.randrange(150000) for _ in range(context)], params)
    steps: list[float] = []
    step_waits: list[float] = []
    try:
        while engine.has_unfinished():
            seen = len(waits)
            t = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t)
            step_waits.append(sum(waits[seen:]))
    finally:
        del runner.collect, runner.launch
    torch.cuda.synchronize()
    skip = 8  # the prefill and the first steps
    gpu = [a.elapsed_time(b) * 1000 for a, b in zip(events[skip:-2], events[skip + 1 : -1], strict=True)]
    busy = [(s - w) * 1e6 for s, w in zip(steps[skip:-2], step_waits[skip:-2], strict=True)]
    return {
        "gpu_period_us": statistics.median(gpu),
        "host_busy_us": statistics.median(busy),
        "host_launch_us": statistics.median(x * 1e6 for x in launches[skip:-2]),
        "host_wait_us": statistics.median(x * 1e6 for x in step_waits[skip:-2]),
        "step_us": statistics.median(x * 1e6 for x in steps[skip:-2]),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--profile", action="store_true", help="also cProfile the host over one greedy run")
    p.add_argument("--replay-only", action="store_true", help="only the graph replays")
    p.add_argument("--trace", help="also write a Chrome trace (torch.profiler) of 10 greedy decode steps here")
    p.add_argument("--set", default="", help="module settings before the engine starts, as in ab_decode.py: "
                   "qwenserve.kernels.pdl.MODE=0")  # fmt: skip
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--kv-gib", type=float, help="KV cache size (default: what the GPU's memory leaves)")
    p.add_argument("--kernels", help="also write per-kernel replay times of the engine's and a fresh graph here (JSON)")
    args = p.parse_args()
    for owner, attr, value in parse_variant(f"set:{args.set}")[1]:
        setattr(owner, attr, value)
    engine = LLMEngine(EngineConfig(model=args.config, load_format="dummy", max_model_len=args.context + 2048,
                                    max_num_seqs=args.max_num_seqs,
                                    kv_cache_memory=int(args.kv_gib * 2**30) if args.kv_gib else None))  # fmt: skip
    greedy = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    sampled = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, seed=1,
                             max_tokens=args.tokens, ignore_eos=True)  # fmt: skip
    timed_decode(engine, args.context, 32, greedy)  # compiles and warms every path once
    timed_decode(engine, args.context, 32, sampled)
    if args.replay_only:
        replay_alone(engine, args.context, greedy, args.kernels)
        return
    for name, params in (("greedy", greedy), ("sampled", sampled)):
        res = timed_decode(engine, args.context, args.tokens, params)
        print(name, " ".join(f"{k} {v:.0f}" for k, v in res.items()), flush=True)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        timed_decode(engine, args.context, args.tokens, greedy)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if args.trace:
        write_trace(engine, args.context, greedy, args.trace)
    replay_alone(engine, args.context, greedy, args.kernels)


def replay_alone(engine: LLMEngine, context: int, params: SamplingParams, kernels_path: str | None = None) -> None:
    """The engine's own batch-1 graph replayed back to back on one step's inputs (as bench/ab_decode.py
    times it): against gpu_period_us, what the engine adds between and around its graphs."""
    rng = random.Random(2)
    engine.add_request("alone", [rng.randrange(150000) for _ in range(context)], params)
    for _ in range(12):
        engine.step()
    runner = engine.runner
    print(f"engine graph {runner.graphs.last_key} replayed alone: {_replay_us(runner.graphs):.0f} us", flush=True)
    engine_graphs = runner.graphs
    kernels = {"engine": _kernel_us(engine_graphs)} if kernels_path else {}
    for name, max_num_seqs in (("fresh, batch 1 only", 1), ("fresh ladder", engine.config.max_num_seqs)):
        runner.graphs = DecodeGraphs(runner.model, max_num_seqs, engine_graphs.max_blocks, runner.block_size,
                                     runner.device)  # fmt: skip
        for _ in range(3):
            engine.step()
        print(f"{name}: {_replay_us(runner.graphs):.0f} us", flush=True)
        if kernels_path:
            kernels[name] = _kernel_us(runner.graphs)
    if kernels_path:
        Path(kernels_path).write_text(json.dumps(kernels, indent=1))
    runner.graphs = engine_graphs
    for rid in list(engine.requests):
        engine.abort(rid)


def _replay_us(graphs: DecodeGraphs) -> float:
    graph = graphs.graphs[graphs.last_key]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(100):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 10


def _kernel_us(graphs: DecodeGraphs, replays: int = 20) -> dict[str, list[float]]:
    """Per kernel name of one graph replay: [calls, total us, min us, max us] (torch.profiler sees inside graphs)."""
    graph = graphs.graphs[graphs.last_key]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    out: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.device_time
        row = out.setdefault(ev.name[:90], [0, 0.0, us, us])
        row[0] += 1 / replays
        row[1] += us / replays
        row[2], row[3] = min(row[2], us), max(row[3], us)
    return out


def write_trace(engine: LLMEngine, context: int, params: SamplingParams, path: str) -> None:
    """The GPU timeline (kernels, copies) and host calls of 10 steady decode steps."""
    rng = random.Random(1)
    engine.add_request("trace", [rng.randrange(150000) for _ in range(context)], params)
    for _ in range(40):
        engine.step()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
    prof.export_chrome_trace(path)
    while engine.has_unfinished():
        engine.step()


if __name__ == "__main__":
    main()
