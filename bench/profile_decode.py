"""Where a decode step's time goes (GPU kernels vs host work), on the full-size dummy model.

Usage on a GPU machine: python bench/profile_decode.py CONFIG_DIR [--batch 1 64] [--context 512 32768]
Prints the wall time per engine step, the GPU time per step and the top kernels.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from qwenserve.config import EngineConfig
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.engine.sampling_params import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--batch", type=int, nargs="*", default=[1, 64])
    p.add_argument("--context", type=int, nargs="*", default=[512])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    engine = LLMEngine(EngineConfig(model=args.config, load_format="dummy", max_model_len=max(8192, max(args.context) + 1024), max_num_seqs=64))
    rng = random.Random(0)
    for context, batch in [(c, b) for c in args.context for b in args.batch]:
        params = SamplingParams(temperature=0.0, max_tokens=args.steps * 3 + 10, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"p{batch}-{i}", [rng.randrange(150000) for _ in range(context)], params)
        while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running + list(engine.scheduler.waiting)):
            engine.step()
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
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
        for rid in list(engine.requests):
            engine.abort(rid)




if __name__ == "__main__":
    main()
