"""Prefill-attention launch settings at the lengths a long qwen-code session meets.

Usage on a GPU machine: python3 bench/tune_prefill_attn.py [--sweep tiles|backends] [--out DIR]
--sweep tiles: the Triton prefill kernel on the cases of a cold prompt (chunks of 8,192 tokens at the end
of 8k / 32k / 128k) and a follow-up turn, for each tile setting, beside torch's SDPA backends on
contiguous K/V (the prefix part unmasked plus the chunk's causal square, as a ceiling). Every
setting's output is checked against the default's first.
--sweep build: what a new chunk shape's first cuDNN call costs (its graph build).
--sweep backends: one sequence's chunk on the Triton kernel against the cuDNN path the engine takes for
long chunks (kernels/cudnn_attention.py, its K/V gather and merge included), over chunk and prefix
lengths: where DENSE_PREFILL_MIN_QUERY should sit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import KVH, D, H, prefill_step  # noqa: E402

from qwenserve.kernels import attention as attn  # noqa: E402
from qwenserve.kernels import cudnn_attention  # noqa: E402

CASES = [(8192, 8192), (8192, 32768), (8192, 131072), (857, 16384 + 857), (2048, 2048)]
CONFIGS = [  # block_m, block_n, warps, stages
    (128, 64, 8, 2),
    (128, 64, 8, 3),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 64, 4, 3),
    (128, 128, 4, 2),
    (64, 64, 4, 3),
    (64, 128, 4, 3),
    (256, 64, 8, 2),
    (256, 128, 8, 2),
]


def attention_flops(q_len: int, ctx: int) -> float:
    prefix = ctx - q_len
    return 4 * H * D * (q_len * prefix + q_len * (q_len + 1) / 2)


def time_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=150)


def sdpa_ceiling(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, ctx: int) -> dict:
    """Torch SDPA per backend on contiguous K/V: prefix unmasked + the chunk's causal square."""
    q_len = q.shape[0]
    prefix = ctx - q_len
    rows = meta.block_tables[0].long()
    k = k_cache[rows].reshape(-1, KVH, D)[:ctx]
    v = v_cache[rows].reshape(-1, KVH, D)[:ctx]
    qq = q.transpose(0, 1)[None]
    kk = k.transpose(0, 1)[None].repeat_interleave(H // KVH, 1).contiguous()
    vv = v.transpose(0, 1)[None].repeat_interleave(H // KVH, 1).contiguous()
    out = {}
    for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        sdp = getattr(torch.nn.attention.SDPBackend, backend)

        def run(sdp=sdp) -> None:
            with torch.nn.attention.sdpa_kernel(sdp):
                if prefix:
                    torch.nn.functional.scaled_dot_product_attention(qq, kk[:, :, :prefix], vv[:, :, :prefix])
                torch.nn.functional.scaled_dot_product_attention(
                    qq, kk[:, :, prefix:], vv[:, :, prefix:], is_causal=True
                )

        try:
            out[backend] = time_ms(run)
        except RuntimeError as exc:
            out[backend] = f"failed: {str(exc)[:120]}"
    return out


def build_cost() -> None:
    """What a chunk shape's first cuDNN attention costs (its graph build) against the same call cached."""
    import time

    def wall_ms(fn) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    for i, (q_len, prefix) in enumerate([(300, 5000), (859, 16640), (1500, 40000), (3001, 80000), (8192, 65536)]):
        q, kc, vc, meta = prefill_step(q_len, prefix + q_len)
        fn = partial(cudnn_attention.chunk_attention, q, kc, vc, meta.block_tables[0], prefix + q_len, D**-0.5)
        first = wall_ms(fn)
        cached = sorted(wall_ms(fn) for _ in range(5))[2]
        triton_ms = sorted(wall_ms(partial(attn.paged_prefill_attention, q, kc, vc, meta.block_tables,
                                           meta.context_lens, meta.query_start_loc, D**-0.5)) for _ in range(5))[2]
        print(f"{'(first ever) ' if i == 0 else ''}q={q_len} prefix={prefix}: first cuDNN call {first:.1f} ms, "
              f"cached {cached:.2f} ms, Triton {triton_ms:.2f} ms", flush=True)


def sweep_backends() -> list[dict]:
    q, k = torch.randn(1, H, 64, D, device="cuda", dtype=torch.bfloat16), torch.randn(1, KVH, 64, D, device="cuda",
                                                                                    dtype=torch.bfloat16)
    try:  # does torch's cuDNN entry point take fewer K/V heads itself?
        torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, k, None, True, 0.0, False, False, scale=0.1)
        print("cuDNN attention with GQA K/V: runs", flush=True)
    except RuntimeError as exc:
        print(f"cuDNN attention with GQA K/V: {str(exc)[:200]}", flush=True)
    rows = []
    for q_len in (128, 256, 512, 1024, 2048, 8192):
        for prefix in (0, 2048, 16384, 65536, 122880):
            q, kc, vc, meta = prefill_step(q_len, prefix + q_len)
            scale = D**-0.5
            tables = (q, kc, vc, meta.block_tables, meta.context_lens, meta.query_start_loc, scale)
            triton_out = attn.paged_prefill_attention(*tables)
            dense = partial(cudnn_attention.chunk_attention, q, kc, vc, meta.block_tables[0], prefix + q_len, scale)
            err = ((dense().float() - triton_out.float()).norm() / triton_out.float().norm()).item()
            row = {"q_len": q_len, "prefix": prefix, "triton_ms": time_ms(partial(attn.paged_prefill_attention, *tables)),
                   "cudnn_ms": time_ms(dense), "rel_diff": err}
            rows.append(row)
            print(f"q={q_len:5d} prefix={prefix:6d}: triton {row['triton_ms']:8.3f} ms  cudnn {row['cudnn_ms']:8.3f} ms"
                  f"  ({row['triton_ms'] / row['cudnn_ms']:.2f}x)  diff {err:.1e}", flush=True)
            del q, kc, vc, meta
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--no-sdpa", action="store_true")
    p.add_argument("--sweep", choices=["tiles", "backends", "build"], default="tiles")
    args = p.parse_args()
    if args.sweep == "build":
        build_cost()
        return
    if args.sweep == "backends":
        results = sweep_backends()
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "tune_prefill_backends.json").write_text(json.dumps(results, indent=1))
        return
    results = []
    for q_len, ctx in CASES:
        q, kc, vc, meta = prefill_step(q_len, ctx)
        scale = D**-0.5
        flops = attention_flops(q_len, ctx)
        tables = (q, kc, vc, meta.block_tables, meta.context_lens, meta.query_start_loc, scale)
        ref = attn.paged_prefill_attention(*tables)
        case = {"q_len": q_len, "ctx": ctx, "rows": []}
        for cfg in CONFIGS:
            try:
                out = attn.paged_prefill_attention(*tables, *cfg)
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                ms = time_ms(partial(attn.paged_prefill_attention, *tables, *cfg))
            except Exception as exc:  # noqa: BLE001 - a tile setting that does not compile is a result
                print(f"q={q_len} ctx={ctx} {cfg} failed: {str(exc)[:160]}", flush=True)
                continue
            row = {"cfg": cfg, "ms": ms, "TFLOPs": flops / ms / 1e9, "rel_err_vs_default": err}
            case["rows"].append(row)
            print(f"q={q_len:5d} ctx={ctx:6d} {cfg}: {ms:8.2f} ms {row['TFLOPs']:5.0f} TFLOP/s err {err:.1e}",
                  flush=True)
        if not args.no_sdpa:
            case["sdpa_ms"] = sdpa_ceiling(q, kc, vc, meta, ctx)
            print(f"q={q_len:5d} ctx={ctx:6d} sdpa: "
                  + ", ".join(f"{k} {v if isinstance(v, str) else f'{v:.2f} ms {flops / v / 1e9:.0f} TFLOP/s'}"
                              for k, v in case["sdpa_ms"].items()), flush=True)
        results.append(case)
        del q, kc, vc, meta, ref
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "tune_prefill_attn.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
