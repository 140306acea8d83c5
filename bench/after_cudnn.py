"""Does a cuDNN prefill slow the decode steps that follow it? (H200 finding, twenty-sixth session)

    python3 bench/after_cudnn.py CONFIG_DIR [--raw op|causal|gather|chunks|strided] [--profile [--trace-dir DIR]]

Batch-1 decode tok/s at 512 (greedy and the model's sampling) before and after a 32k-token prompt whose
chunks attend through cuDNN inside the engine's prefill steps; with --raw the 32k prompt is replaced by a part
of that work done outside the engine (see --help), then again after gc.collect() and torch.cuda.empty_cache().
Measured (H200): on f07dcf9 the engine prompt slowed penalised sampled decode ~8% for the rest of the process
(411 -> 380 tok/s; greedy, unpenalised and eager-sampler decode unchanged); no --raw mode did (strided too:
411.4 -> 411.3). The slowed steps were the ones that launched the eager penalty bookkeeping after their sampler
graph; since 9710117 the graph does it, and sampled decode stays at 414-415 after the prompt."""

import argparse
import gc
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qwenserve.bench import decode_speed, model_sampling, random_prompt, run_requests
from qwenserve.config import EngineConfig
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.engine.penalty_state import PenaltyState
from qwenserve.kernels import cudnn_attention

CHUNK_ENDS = (8192, 16384, 24576, 32768)  # a 32k prompt's 8k-token chunks


def _cudnn(q: torch.Tensor, kv: torch.Tensor, causal: bool) -> None:
    torch.ops.aten._scaled_dot_product_cudnn_attention(q, kv, kv, None, True, 0.0, causal, False, scale=0.1)


def raw_work(engine: LLMEngine, mode: str) -> None:
    """A part of a 32k prompt's cuDNN prefill, done outside the engine."""
    table = torch.arange(CHUNK_ENDS[-1] // engine.config.block_size, dtype=torch.int32, device="cuda")
    caches = list(zip(engine.runner.k_caches, engine.runner.v_caches, strict=True))
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    if mode == "op":
        _cudnn(torch.randn(1, 32, 8192, 128, **bf16), torch.randn(1, 4, 16384, 128, **bf16), False)
        torch.cuda.synchronize()
        return
    for end in CHUNK_ENDS:
        if mode in ("chunks", "strided"):  # strided: q a view of a fused qkv row, as the model passes it
            q = torch.randn(8192, 40, 128, **bf16)[:, :32] if mode == "strided" else torch.randn(8192, 32, 128, **bf16)
            for k_cache, v_cache in caches:
                cudnn_attention.chunk_attention(q, k_cache, v_cache, table, end, 0.088)
        elif mode == "gather":
            for k_cache, v_cache in caches:
                k = cudnn_attention._gather_context(k_cache, table, end)
                v = cudnn_attention._gather_context(v_cache, table, end)
                k.float().lerp_(v.float(), 0.5).to(torch.bfloat16)
        else:  # causal: the chunk over itself (causal) and over its prefix (unmasked)
            q, kv = torch.randn(1, 32, 8192, 128, **bf16), torch.randn(1, 4, end, 128, **bf16)
            _cudnn(q, kv[:, :, end - 8192 :], True)
            if end > 8192:
                _cudnn(q, kv[:, :, : end - 8192], False)
    torch.cuda.synchronize()


def _allocator_counters() -> str:
    """The caching allocator's cudaMalloc / cudaFree / retry counts and the device's free memory: an allocation
    that fails frees every cached block, which synchronises the device (and so the overlap of steps)."""
    stats = torch.cuda.memory_stats()
    names = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams", "num_ooms")
    free = torch.cuda.mem_get_info()[0] / 2**30
    return " ".join(f"{n.removeprefix('num_')} {stats.get(n, 0)}" for n in names) + f" free {free:.2f} GiB"


def _persisting_l2_limit() -> int | str:
    """cudaDeviceGetLimit(cudaLimitPersistingL2CacheSize): a library that set it would shrink everyone's L2."""
    import ctypes
    import glob

    import nvidia  # the CUDA runtime wheel torch depends on

    for path in sorted(glob.glob(f"{list(nvidia.__path__)[0]}/**/libcudart.so*", recursive=True)):
        value = ctypes.c_size_t()
        if ctypes.CDLL(path).cudaDeviceGetLimit(ctypes.byref(value), 0x06) == 0:
            return value.value
    return "unknown"


def _host_timing(engine: LLMEngine, rng: random.Random, sampling: dict[str, Any]) -> None:
    """Print the mean host time per step of one 256-token request in the runner's launch, its collect (the wait
    for the step before), the sampler graphs and the eager penalty bookkeeping."""

    runner = engine.runner
    spent = {"launch": 0.0, "collect": 0.0, "sampler_graphs.sample": 0.0, "penalties.record": 0.0}
    originals = {"launch": runner.launch, "collect": runner.collect, "sampler_graphs.sample": runner.sampler_graphs.sample,
                 "penalties.record": runner.penalties.record}

    def timed(name: str) -> Callable[..., Any]:
        def call(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return originals[name](*a, **k)
            finally:
                spent[name] += time.perf_counter() - start
        return call

    runner.launch, runner.collect = timed("launch"), timed("collect")
    runner.sampler_graphs.sample, runner.penalties.record = timed("sampler_graphs.sample"), timed("penalties.record")
    try:
        start = time.perf_counter()
        res = run_requests(engine, [random_prompt(512, rng)], 256, sampling)
        total = time.perf_counter() - start
    finally:
        for name in ("launch", "collect"):
            delattr(runner, name)
        del runner.sampler_graphs.sample, runner.penalties.record
    steps = len(res["token_times"])
    print(f"{'':28s} per step (us): " + "  ".join(f"{k} {v / steps * 1e6:.0f}" for k, v in spent.items())
          + f"  all {total / steps * 1e6:.0f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", type=Path)
    ap.add_argument("--raw", choices=["op", "causal", "gather", "chunks", "strided"],
                    help="op: one bare cuDNN call; causal: bare calls, causal and not, at the engine's shapes; "
                    "gather: the contiguous copies and merge alone; chunks: chunk_attention on the engine's caches "
                    "for a 32k context, every layer, outside the engine; strided: chunks with q a view of a qkv row")
    ap.add_argument("--variants", action="store_true",
                    help="also time sampled decode without penalties, with the eager sampler (logprobs), and sampled "
                    "again after its sampler graphs are recaptured; print the CUDA runtime's L2 persisting limit")
    ap.add_argument("--host-timing", action="store_true",
                    help="also print the mean host time per sampled decode step in launch, in collect (the wait for the "
                    "step before) and in the rest of engine.step")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables of sampled decode too")
    ap.add_argument("--trace-dir", type=Path, help="write each profile's chrome trace here")
    args = ap.parse_args()
    cudnn_attention.set_enabled(args.raw in (None, "chunks", "strided"))
    engine = LLMEngine(EngineConfig(model=str(args.config), load_format="dummy", max_model_len=40000))
    rng = random.Random(0)
    sampling = model_sampling(args.config)
    run_requests(engine, [random_prompt(256, rng)], 8)

    def measure(label: str) -> None:
        greedy = decode_speed(engine, 512, 256, rng)["tok_s"]
        sampled = decode_speed(engine, 512, 256, rng, sampling)["tok_s"]
        print(f"{label:28s} greedy {greedy:6.1f}  sampled {sampled:6.1f}  {_allocator_counters()}", flush=True)
        if args.variants:
            plain = decode_speed(engine, 512, 256, rng, sampling | {"repetition_penalty": 1.0})["tok_s"]
            eager = decode_speed(engine, 512, 256, rng, sampling | {"logprobs": 0})["tok_s"]
            engine.runner.sampler_graphs.graphs.clear()
            again = decode_speed(engine, 512, 256, rng, sampling)["tok_s"]
            print(f"{'':28s} no penalties {plain:6.1f}  eager sampler {eager:6.1f}  recaptured {again:6.1f}  "
                  f"L2 persisting limit {_persisting_l2_limit()}", flush=True)
            pen = engine.runner.penalties
            print(f"{'':28s} penalty rows {pen.seen.shape[0]} generation {pen.generation} seen at {pen.seen.data_ptr():#x} "
                  f"counts at {pen.counts.data_ptr():#x} keys at {engine.runner.sampler_graphs.keys.data_ptr():#x}")
            fresh = PenaltyState(pen.vocab_size, pen.device)
            engine.runner.penalties = engine.runner.sampler_graphs.penalties = fresh
            engine.runner.sampler_graphs.graphs.clear()
            renewed = decode_speed(engine, 512, 256, rng, sampling)["tok_s"]
            freq = decode_speed(engine, 512, 256, rng, sampling | {"repetition_penalty": 1.0, "frequency_penalty": 0.1})
            print(f"{'':28s} {_allocator_counters()}")
            print(f"{'':28s} fresh penalty buffers {renewed:6.1f} (at {fresh.seen.data_ptr():#x})  "
                  f"frequency penalty instead {freq['tok_s']:6.1f}", flush=True)
        if args.host_timing:
            _host_timing(engine, rng, sampling)
            _host_timing(engine, rng, sampling | {"repetition_penalty": 1.0})
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run_requests(engine, [random_prompt(512, rng)], 24, sampling)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60))
            if args.trace_dir:
                prof.export_chrome_trace(str(args.trace_dir / f"{label.split()[0]}.json"))

    measure("before")
    if args.raw:
        raw_work(engine, args.raw)
    else:
        run_requests(engine, [random_prompt(CHUNK_ENDS[-1], rng)], 1)
    measure("after the cuDNN work")
    if not args.profile:
        gc.collect()
        torch.cuda.empty_cache()
        measure("after gc, empty_cache()")


if __name__ == "__main__":
    main()
