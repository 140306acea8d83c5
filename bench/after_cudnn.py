"""Does a cuDNN attention call slow the decode steps that follow it? (H200 finding, twenty-sixth session)

    python3 bench/after_cudnn.py CONFIG_DIR [--raw]

Batch-1 decode tok/s at 512 (greedy and the model's sampling) before and after a 32k-token prompt whose
chunks attend through cuDNN; with --raw the engine keeps to Triton and torch's cuDNN attention op is
called once on its own instead. Then again after gc.collect() and torch.cuda.empty_cache()."""

import argparse
import gc
import random
from pathlib import Path

import torch

from qwenserve.bench import decode_speed, model_sampling, random_prompt, run_requests
from qwenserve.config import EngineConfig
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.kernels import cudnn_attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", type=Path)
    ap.add_argument("--raw", choices=["op", "causal", "gather", "chunks"],
                    help="op: one bare cuDNN call; causal: bare calls, causal and not, at the engine's shapes; "
                    "gather: the contiguous copies alone; chunks: chunk_attention on the engine's caches for a "
                    "32k context, every layer, outside the engine")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables of sampled decode too")
    ap.add_argument("--trace-dir", type=Path, help="write each profile's chrome trace here")
    args = ap.parse_args()
    cudnn_attention.set_enabled(args.raw in (None, "chunks"))
    engine = LLMEngine(EngineConfig(model=str(args.config), load_format="dummy", max_model_len=40000))
    rng = random.Random(0)
    sampling = model_sampling(args.config)
    run_requests(engine, [random_prompt(256, rng)], 8)

    def measure(label: str) -> None:
        greedy = decode_speed(engine, 512, 256, rng)["tok_s"]
        sampled = decode_speed(engine, 512, 256, rng, sampling)["tok_s"]
        print(f"{label:28s} greedy {greedy:6.1f}  sampled {sampled:6.1f}", flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run_requests(engine, [random_prompt(512, rng)], 24, sampling)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60))
            if args.trace_dir:
                prof.export_chrome_trace(str(args.trace_dir / f"{label.split()[0]}.json"))

    measure("before")
    if args.raw == "chunks":
        runner = engine.runner
        table = torch.arange(2048, dtype=torch.int32, device="cuda")
        for end in (8192, 16384, 24576, 32768):
            q = torch.randn(8192, 32, 128, device="cuda", dtype=torch.bfloat16)
            for k_cache, v_cache in zip(runner.k_caches, runner.v_caches, strict=True):
                cudnn_attention.chunk_attention(q, k_cache, v_cache, table, end, 0.088)
        torch.cuda.synchronize()
    elif args.raw == "causal":
        q = torch.randn(1, 32, 8192, 128, device="cuda", dtype=torch.bfloat16)
        for end in (8192, 16384, 24576, 32768):
            kv = torch.randn(1, 4, end, 128, device="cuda", dtype=torch.bfloat16)
            own = kv[:, :, end - 8192 :]
            torch.ops.aten._scaled_dot_product_cudnn_attention(q, own, own, None, True, 0.0, True, False, scale=0.1)
            if end > 8192:
                past = kv[:, :, : end - 8192]
                torch.ops.aten._scaled_dot_product_cudnn_attention(q, past, past, None, True, 0.0, False, False,
                                                                   scale=0.1)
        torch.cuda.synchronize()
    elif args.raw == "gather":
        runner = engine.runner
        table = torch.arange(2048, dtype=torch.int32, device="cuda")
        for end in (8192, 16384, 24576, 32768):
            for k_cache, v_cache in zip(runner.k_caches, runner.v_caches, strict=True):
                k = cudnn_attention._gather_context(k_cache, table, end)
                v = cudnn_attention._gather_context(v_cache, table, end)
                k.float().lerp_(v.float(), 0.5).to(torch.bfloat16)
        torch.cuda.synchronize()
    elif args.raw:
        q = torch.randn(1, 32, 8192, 128, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(1, 4, 16384, 128, device="cuda", dtype=torch.bfloat16)
        torch.ops.aten._scaled_dot_product_cudnn_attention(q, kv, kv, None, True, 0.0, False, False, scale=0.1)
        torch.cuda.synchronize()
        del q, kv
    else:
        run_requests(engine, [random_prompt(32768, rng)], 1)
    measure("after the cuDNN call")
    if not args.profile:
        gc.collect()
        torch.cuda.empty_cache()
        measure("after gc, empty_cache()")


if __name__ == "__main__":
    main()
