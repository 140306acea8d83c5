"""Where a decode step's time goes (GPU kernels vs host work), on the full-size dummy model.

Usage on a GPU machine: python bench/profile_decode.py CONFIG_DIR [--batch 1 64] [--context 512 32768]
    [--sampling greedy|model] [--sync-debug]
Prints the wall time per engine step, the GPU time per step, the top kernels and the top host ops.
--sampling model decodes with the model's generation_config sampling (what qwen-code gets);
--sync-debug prints where a step makes the host wait for the GPU (which defeats overlapped steps).
"""

from __future__ import annotations

import argparse
import random
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from qwenserve.bench import model_sampling
from qwenserve.config import EngineConfig
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.engine.sampling_params import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--batch", type=int, nargs="*", default=[1, 64])
    p.add_argument("--context", type=int, nargs="*", default=[512])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampling", choices=["greedy", "model"], default="greedy")
    p.add_argument("--sync-debug", action="store_true")
    args = p.parse_args()
    engine = LLMEngine(EngineConfig(model=args.config, load_format="dummy", max_model_len=max(8192, max(args.context) + 1024), max_num_seqs=64))
    rng = random.Random(0)
    for context, batch in [(c, b) for c in args.context for b in args.batch]:
        sampling = model_sampling(Path(args.config)) if args.sampling == "model" else {"temperature": 0.0}
        params = SamplingParams(**sampling, max_tokens=args.steps * 4 + 10, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"p{batch}-{i}", [rng.randrange(150000) for _ in range(context)], params)
        while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running + list(engine.scheduler.waiting)):
            engine.step()
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
        if args.sync_debug:
            show_syncs(engine)
        t = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / args.steps
        graphs = engine.runner.graphs
        if graphs is not None:
            # The same graph replayed back to back: GPU time including the gaps between its kernels,
            # without any host work between steps.
            graph = graphs.graphs[graphs.last_key]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.steps):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            print(f"ctx {context} batch {batch}: graph replay alone {start.elapsed_time(end) / args.steps:.2f} ms/step")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                engine.step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu_total = sum(e.self_device_time_total for e in events) / args.steps / 1000
        print(f"ctx {context} batch {batch}: wall {wall * 1000:.2f} ms/step ({batch / wall:.0f} tok/s), GPU {gpu_total:.2f} ms/step")
        print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))
        print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
        for rid in list(engine.requests):
            engine.abort(rid)




def show_syncs(engine: LLMEngine, steps: int = 3) -> None:
    """Run a few steps with CUDA sync debugging on; print each synchronising call's stack once."""
    seen: set[str] = set()

    def record(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        stack = "".join(traceback.format_stack(limit=12)[:-2])
        if stack not in seen:
            seen.add(stack)
            print(f"SYNC: {message}\n{stack}")

    old = warnings.showwarning
    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            for _ in range(steps):
                engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = old
    print(f"{len(seen)} distinct synchronising call sites in {steps} steps")


if __name__ == "__main__":
    main()
