"""What the sampler costs per decode step, on the real vocabulary (151,936), with the sampling
qwen-code gets (the model's generation_config: temperature 0.7, top-p 0.8, top-k 20,
repetition penalty 1.05): the full-vocabulary sort in torch, the top-k candidates in torch,
and the Triton kernels; greedy argmax for scale.

Usage on a GPU machine: python bench/profile_sampler.py [--batch 1 8 64] [--iters 200]
Prints GPU time (CUDA events) and host time per call for each path.
"""

from __future__ import annotations

import argparse
import time

import torch

from qwenserve.engine.sampler import SamplingBatch, num_candidates_for, sample

VOCAB = 151_936


def qwen_code_batch(rows: int, top_k: int, penalties: bool) -> SamplingBatch:
    dev = "cuda"
    batch = SamplingBatch(
        temperature=torch.full((rows,), 0.7, device=dev),
        top_p=torch.full((rows,), 0.8, device=dev),
        top_k=torch.full((rows,), top_k, dtype=torch.int64, device=dev),
        min_p=torch.zeros(rows, device=dev),
        seeds=torch.arange(rows, dtype=torch.int64, device=dev),
        steps=torch.zeros(rows, dtype=torch.int64, device=dev),
        needs_top_k_p=True,
    )
    if penalties:
        batch.seen = torch.rand(rows, VOCAB, device=dev) < 0.05
        batch.counts = torch.zeros(rows, VOCAB, dtype=torch.int32, device=dev)
        batch.penalty_rows = torch.arange(rows, device=dev)
        batch.repetition_penalty = torch.full((rows,), 1.05, device=dev)
        batch.frequency_penalty = torch.zeros(rows, device=dev)
        batch.presence_penalty = torch.zeros(rows, device=dev)
    return batch


def time_call(fn, iters: int) -> tuple[float, float]:
    """(GPU µs, host µs) per call."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t = time.perf_counter()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    host = (time.perf_counter() - t) / iters * 1e6
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3, host


def time_graph(fn, iters: int) -> float:
    """GPU µs per call with the call captured in a CUDA graph (no launch overhead, as in a step)."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def sweep(batches: list[int], iters: int) -> None:
    from qwenserve.kernels import sampling

    print("| batch | slice | warps | GPU µs / step (graphed) |\n|---:|---:|---:|---:|")
    for rows in batches:
        logits = (torch.randn(rows, VOCAB, device="cuda") * 4).to(torch.bfloat16)
        top = qwen_code_batch(rows, 20, penalties=True)
        top.num_candidates = num_candidates_for([20])
        for chunk in (1024, 2048, 4096, 8192):
            for warps in (2, 4, 8):
                sampling.TOPK_CHUNK, sampling.TOPK_NUM_WARPS = chunk, warps
                gpu = time_graph(lambda x=logits, b=top: sample(x, b, True), iters)
                print(f"| {rows} | {chunk} | {warps} | {gpu:.1f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="*", default=[1, 8, 64])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--sweep", action="store_true", help="time the Triton path's slice size and warps")
    args = p.parse_args()
    if args.sweep:
        sweep(args.batch, args.iters)
        return
    print("| batch | path | GPU µs / step | host µs / step |\n|---:|---|---:|---:|")
    for rows in args.batch:
        logits = (torch.randn(rows, VOCAB, device="cuda") * 4).to(torch.bfloat16)  # as the model returns them
        batch = qwen_code_batch(rows, 20, penalties=True)
        top = qwen_code_batch(rows, 20, penalties=True)
        top.num_candidates = num_candidates_for([20])
        paths = {
            "greedy argmax": (None, False),
            "full-vocabulary sort, torch (before)": (batch, False),
            "top-k candidates, torch": (top, False),
            "two-pass top-k + draw, Triton": (top, True),
        }
        for name, (b, kernels) in paths.items():
            fn = (lambda x=logits: x.argmax(dim=-1)) if b is None else (lambda x=logits, b=b, k=kernels: sample(x, b, k))
            gpu, host = time_call(fn, args.iters)
            print(f"| {rows} | {name} | {gpu:.1f} | {host:.1f} |", flush=True)


if __name__ == "__main__":
    main()
