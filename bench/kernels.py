"""Micro-benchmarks of the Triton kernels against the torch reference and the roofline.

    python3 bench/kernels.py [--tune-moe] [--tune-attn] [--quick] [--out DIR]

Writes DIR/kernels.json (DIR defaults to $OUT, else the current directory) and prints a
short table. Bandwidth figures count the fewest bytes each kernel must move (KV cache read
once; the routed experts' weights read once), over the copy bandwidth measured in the same
run and over the datasheet HBM peak. --tune-moe sweeps the MoE tiles per token count and
prints rows for qwenserve/kernels/moe_configs.py; --tune-attn sweeps the attention tiles.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenserve.kernels import attention as attn  # noqa: E402
from qwenserve.kernels import moe_configs  # noqa: E402
from qwenserve.kernels.kv_cache import write_kv_cache  # noqa: E402
from qwenserve.kernels.moe import (  # noqa: E402
    _launch_gemm1,
    _launch_gemm2,
    fused_moe_grouped_mm,
    fused_moe_triton,
    moe_align,
)
from qwenserve.kernels.moe_configs import MoEConfig  # noqa: E402
from qwenserve.kernels.norm import rms_norm  # noqa: E402
from qwenserve.model import ops  # noqa: E402
from qwenserve.model.ops import AttentionMetadata  # noqa: E402

DEV = "cuda"
PEAK_HBM = {"H100": 3.35e12, "H200": 4.8e12}
PEAK_BF16 = 989e12
E, INTER, HIDDEN, TOPK = 128, 768, 2048, 8
H, KVH, D, BS = 32, 4, 128, 16


_flush_buf: torch.Tensor | None = None


def _graph_ms(body, replays: int) -> float:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def bench(fn, graph: bool = False, rep: int = 100) -> float:
    """Median milliseconds per call with a cold L2, as in a real step (48 layers evict it).

    graph=True: n calls captured in one CUDA graph (as the engine's decode runs them), each
    after a 96 MB write that evicts the L2; the graph of the writes alone is subtracted.
    Otherwise triton's do_bench (which flushes the L2 itself), for code that cannot be captured.
    """
    global _flush_buf
    if not graph:
        return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")
    if _flush_buf is None:
        _flush_buf = torch.empty(96 << 20, dtype=torch.uint8, device=DEV)
    fn()
    torch.cuda.synchronize()
    n = 10 if rep <= 30 else 20
    replays = 5 if rep <= 30 else 11

    def flushes() -> None:
        for _ in range(n):
            _flush_buf.zero_()

    def body() -> None:
        for _ in range(n):
            _flush_buf.zero_()
            fn()

    return max(_graph_ms(body, replays) - _graph_ms(flushes, replays), 0.0) / n


def bench_warm(fn) -> float:
    """Median ms per call replayed back to back in a CUDA graph (L2 stays warm)."""
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    ms = bench(partial(b.copy_, a))
    return 2 * (1 << 30) / (ms * 1e-3)


def peak_hbm() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_HBM.items() if k in name), 3.35e12)


# ---------------------------------------------------------------------------- attention


def decode_step(batch: int, ctx: int, seed: int = 0):
    torch.manual_seed(seed)
    blocks = (ctx + BS - 1) // BS
    num_blocks = batch * blocks + 1
    perm = torch.randperm(num_blocks - 1, device=DEV).to(torch.int32) + 1
    tables = perm[: batch * blocks].view(batch, blocks).contiguous()
    k_cache = torch.randn(num_blocks, BS, KVH, D, device=DEV, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, H, D, device=DEV, dtype=torch.bfloat16)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(batch, dtype=torch.int64, device=DEV),
        block_tables=tables,
        context_lens=torch.full((batch,), ctx, dtype=torch.int32, device=DEV),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=DEV),
        max_query_len=1,
        max_context_len=ctx,
        is_decode_only=True,
    )
    return q, k_cache, v_cache, meta


def bench_decode(results: dict, hbm: float, copy_bw: float, tune: bool) -> None:
    rows = []
    for batch, ctx in [(1, 512), (1, 8192), (1, 32768), (8, 8192), (32, 2048), (64, 1024), (4, 131072)]:
        q, kc, vc, meta = decode_step(batch, ctx)
        scale = D**-0.5
        kv_bytes = batch * ctx * KVH * D * 2 * 2
        call = partial(attn.paged_attention, q, kc, vc, meta, scale)
        ms = bench(call, graph=True)
        row = {
            "batch": batch,
            "ctx": ctx,
            "splits": attn.decode_num_splits(
                batch, KVH, torch.cuda.get_device_properties(0).multi_processor_count
            ),
            "ms": ms,
            "kv_bytes": kv_bytes,
            "GBps": kv_bytes / ms / 1e6,
            "frac_hbm_peak": kv_bytes / (ms * 1e-3) / hbm,
            "frac_copy_bw": kv_bytes / (ms * 1e-3) / copy_bw,
            "warm_l2_ms": bench_warm(call),
        }
        if batch * ctx <= 8 * 8192:
            row["torch_ms"] = bench(partial(ops.paged_attention, q, kc, vc, meta, scale))
        if tune and (batch, ctx) in ((1, 8192), (1, 32768), (8, 8192)):
            sweep = []
            for splits in (8, 16, 32, 64):
                for tile in (32, 64, 128):
                    for warps, stages in ((4, 2), (4, 3), (4, 4), (8, 3)):
                        fn = partial(
                            attn.paged_decode_attention,
                            *(q, kc, vc, meta.block_tables, meta.context_lens, scale),
                            *(splits, tile, warps, stages),
                        )
                        try:
                            sweep.append((bench(fn, graph=True, rep=30), splits, tile, warps, stages))
                        except Exception as exc:  # noqa: BLE001 - a config that fails to compile is skipped
                            print("decode config failed", splits, tile, warps, stages, exc)
            sweep.sort()
            row["tune_best"] = sweep[:5]
        rows.append(row)
        print(
            f"decode B={batch:3d} ctx={ctx:6d}: {ms * 1e3:8.1f} us  {row['GBps']:7.0f} GB/s "
            f"({row['frac_hbm_peak']:.0%} of peak)  torch {row.get('torch_ms', float('nan')) * 1e3:9.1f} us"
            + (f"  best {row['tune_best'][0]}" if "tune_best" in row else "")
        )
        del q, kc, vc, meta
    results["decode_attention"] = rows


def prefill_step(q_len: int, ctx: int, seed: int = 0):
    torch.manual_seed(seed)
    blocks = (ctx + BS - 1) // BS
    perm = torch.randperm(blocks, device=DEV).to(torch.int32) + 1
    k_cache = torch.randn(blocks + 1, BS, KVH, D, device=DEV, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(q_len, H, D, device=DEV, dtype=torch.bfloat16)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(q_len, dtype=torch.int64, device=DEV),
        block_tables=perm[None, :].contiguous(),
        context_lens=torch.tensor([ctx], dtype=torch.int32, device=DEV),
        query_start_loc=torch.tensor([0, q_len], dtype=torch.int32, device=DEV),
        max_query_len=q_len,
        max_context_len=ctx,
        is_decode_only=False,
    )
    return q, k_cache, v_cache, meta


def bench_prefill(results: dict, tune: bool) -> None:
    rows = []
    for q_len, ctx in [(2048, 2048), (8192, 8192), (20480, 20480), (857, 16384 + 857), (4096, 32768)]:
        q, kc, vc, meta = prefill_step(q_len, ctx)
        scale = D**-0.5
        prefix = ctx - q_len
        # causal: each query i sees prefix + i + 1 keys; 2 matmuls x 2 flops per MAC
        flops = 4 * H * D * (q_len * prefix + q_len * (q_len + 1) / 2)
        ms = bench(partial(attn.paged_attention, q, kc, vc, meta, scale))
        row = {
            "q_len": q_len,
            "ctx": ctx,
            "ms": ms,
            "TFLOPs": flops / ms / 1e9,
            "frac_peak": flops / ms / 1e9 / 989,
        }
        if prefix == 0:  # torch's own flash SDPA on contiguous K/V: what a good kernel reaches
            k = kc.view(-1, KVH, D)[: ctx + BS].transpose(0, 1)[None, :, :q_len]
            v = vc.view(-1, KVH, D)[: ctx + BS].transpose(0, 1)[None, :, :q_len]
            qq = q.transpose(0, 1)[None]
            row["sdpa_ms"] = bench(
                lambda qq=qq, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
                    qq, k, v, is_causal=True, enable_gqa=True
                )
            )
        if tune and q_len in (8192, 857):
            sweep = []
            for bm, bn, warps, stages in [
                (128, 64, 8, 2),
                (128, 64, 8, 3),
                (128, 128, 8, 2),
                (128, 32, 4, 3),
                (64, 64, 4, 3),
                (128, 64, 4, 3),
                (256, 64, 8, 2),
                (128, 128, 8, 3),
            ]:
                fn = partial(
                    attn.paged_prefill_attention,
                    *(q, kc, vc, meta.block_tables, meta.context_lens, meta.query_start_loc, scale),
                    *(bm, bn, warps, stages),
                )
                try:
                    sweep.append((bench(fn, rep=50), bm, bn, warps, stages))
                except Exception as exc:  # noqa: BLE001
                    print("prefill config failed", bm, bn, warps, stages, exc)
            sweep.sort()
            row["tune_best"] = sweep[:5]
        rows.append(row)
        print(
            f"prefill q={q_len:6d} ctx={ctx:6d}: {ms:8.2f} ms  {row['TFLOPs']:6.0f} TFLOP/s  "
            f"sdpa {row.get('sdpa_ms', float('nan')):.2f} ms"
            + (f"  best {row['tune_best'][0]}" if "tune_best" in row else "")
        )
        del q, kc, vc, meta
    results["prefill_attention"] = rows


def bench_small(results: dict) -> None:
    t = 256
    k = torch.randn(t, KVH, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kc = torch.randn(4096, BS, KVH, D, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    slots = torch.randperm(4096 * BS, device=DEV)[:t]
    x = torch.randn(t, HIDDEN, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(HIDDEN, device=DEV, dtype=torch.bfloat16)
    qn = torch.randn(t, H, D, device=DEV, dtype=torch.bfloat16)
    wq = torch.randn(D, device=DEV, dtype=torch.bfloat16)
    res = {
        "write_kv_T256_us": bench(lambda: write_kv_cache(k, v, kc, vc, slots), graph=True) * 1e3,
        "write_kv_T256_torch_us": bench(lambda: ops.write_kv_cache(k, v, kc, vc, slots), graph=True) * 1e3,
        "rms_norm_T256x2048_us": bench(lambda: rms_norm(x, w, 1e-6), graph=True) * 1e3,
        "rms_norm_T256x2048_torch_us": bench(lambda: ops.rms_norm(x, w, 1e-6), graph=True) * 1e3,
        "qk_norm_T256x32x128_us": bench(lambda: rms_norm(qn, wq, 1e-6), graph=True) * 1e3,
        "qk_norm_T256x32x128_torch_us": bench(lambda: ops.rms_norm(qn, wq, 1e-6), graph=True) * 1e3,
    }
    for name, val in res.items():
        print(f"{name:32s} {val:8.1f}")
    results["small_ops"] = res


# ---------------------------------------------------------------------------- MoE

MOE_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]

# (n, k, warps, stages) candidates per GEMM, by BLOCK_M.
CANDIDATES = {
    16: [
        (16, 256, 4, 4),
        (16, 128, 4, 5),
        (32, 128, 4, 4),
        (32, 256, 4, 3),
        (64, 128, 4, 4),
        (64, 64, 4, 5),
        (64, 256, 4, 3),
        (128, 128, 4, 3),
        (128, 64, 4, 4),
        (32, 64, 4, 5),
        (16, 128, 2, 4),
        (16, 256, 2, 3),
        (32, 128, 2, 4),
        (32, 64, 4, 6),
        (16, 512, 4, 2),
        (32, 512, 4, 2),
        (64, 512, 4, 2),
        (32, 256, 8, 3),
        (64, 256, 8, 3),
        (128, 256, 8, 2),
    ],
    32: [(64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3), (64, 128, 4, 4)],
    64: [
        (64, 64, 4, 4),
        (128, 64, 4, 4),
        (128, 64, 8, 4),
        (64, 128, 4, 3),
        (128, 128, 8, 3),
        (256, 64, 8, 3),
    ],
    128: [
        (64, 64, 8, 4),
        (128, 64, 8, 4),
        (128, 64, 8, 3),
        (64, 64, 4, 4),
        (128, 128, 8, 3),
        (256, 64, 8, 3),
    ],
}


def block_ms_for(num_tokens: int) -> list[int]:
    rows_per_expert = num_tokens * TOPK / E
    if rows_per_expert <= 2:
        return [16]
    if rows_per_expert <= 16:
        return [16, 32, 64]
    if rows_per_expert <= 64:
        return [32, 64, 128]
    return [64, 128]


def moe_inputs(num_tokens: int, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(num_tokens, HIDDEN, device=DEV, dtype=torch.bfloat16)
    logits = torch.randn(num_tokens, E, device=DEV)
    weights, ids = torch.topk(logits.softmax(-1), TOPK, dim=-1)
    return x, (weights / weights.sum(-1, keepdim=True)).to(torch.bfloat16), ids


def tune_moe(w13: torch.Tensor, w2: torch.Tensor, tokens: list[int]) -> tuple[list, dict]:
    """Per token count: the best GEMM1 and GEMM2 tiles for each BLOCK_M, then the best BLOCK_M."""
    table, log = [], {}
    for t in tokens:
        x, weights, ids = moe_inputs(t)
        best = None
        for bm in block_ms_for(t):
            sorted_ids, expert_ids, num_rows = moe_align(ids, E, bm)
            act = torch.empty(sorted_ids.shape[0], INTER, dtype=x.dtype, device=DEV)
            out = torch.empty(t * TOPK, HIDDEN, dtype=x.dtype, device=DEV)
            wflat = weights.reshape(-1)
            g1, g2 = [], []
            for n, k, warps, stages in CANDIDATES[bm]:
                cfg = MoEConfig(bm, n, k, warps, stages, n, k, warps, stages)
                try:
                    ms1 = bench(
                        partial(_launch_gemm1, x, w13, act, sorted_ids, expert_ids, num_rows, TOPK, cfg),
                        graph=True,
                        rep=30,
                    )
                    g1.append((ms1, n, k, warps, stages))
                    ms2 = bench(
                        partial(_launch_gemm2, act, w2, out, sorted_ids, expert_ids, num_rows, wflat, cfg),
                        graph=True,
                        rep=30,
                    )
                    g2.append((ms2, n, k, warps, stages))
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                    print("moe config failed", t, bm, n, k, warps, stages, type(exc).__name__)
            g1.sort()
            g2.sort()
            total = g1[0][0] + g2[0][0]
            log[f"{t}/{bm}"] = {"gemm1": g1[:3], "gemm2": g2[:3]}
            if best is None or total < best[0]:
                best = (total, MoEConfig(bm, *g1[0][1:], *g2[0][1:]))
        print(f"tune T={t:5d}: {best[0] * 1e3:8.1f} us  {best[1]}")
        table.append((t, best[1]))
    return table, log


def bench_moe(results: dict, hbm: float, copy_bw: float, tune: bool, quick: bool, tokens: list[int] | None = None) -> None:
    torch.manual_seed(0)
    w13 = torch.randn(E, 2 * INTER, HIDDEN, device=DEV, dtype=torch.bfloat16) * HIDDEN**-0.5
    w2 = torch.randn(E, HIDDEN, INTER, device=DEV, dtype=torch.bfloat16) * INTER**-0.5
    tokens = tokens or (MOE_TOKENS if not quick else [1, 8, 64, 512, 4096])
    if tune:
        table, log = tune_moe(w13, w2, tokens)
        results["moe_tune"] = {
            "table": [(t, cfg.__dict__) for t, cfg in table],
            "log": log,
        }
        moe_configs.set_moe_table((E, INTER, HIDDEN, TOPK), table, moe_configs.GROUPED_MM_MIN_TOKENS)
        print("rows for moe_configs.py:")
        for t, cfg in table:
            print(
                f"        ({t}, MoEConfig({cfg.block_m}, {cfg.n1}, {cfg.k1}, {cfg.warps1}, {cfg.stages1}, "
                f"{cfg.n2}, {cfg.k2}, {cfg.warps2}, {cfg.stages2})),"
            )
    expert_bytes = 3 * HIDDEN * INTER * 2
    rows = []
    for t in tokens:
        x, weights, ids = moe_inputs(t, seed=1)
        touched = int(torch.unique(ids).numel())
        bytes_min = touched * expert_bytes + 2 * t * HIDDEN * 2
        flops = 2 * t * TOPK * 3 * HIDDEN * INTER
        ms = bench(lambda x=x, w=weights, i=ids: fused_moe_triton(x, w13, w2, w, i), graph=True)
        row = {
            "tokens": t,
            "experts_touched": touched,
            "ms": ms,
            "bytes_min": bytes_min,
            "GBps": bytes_min / ms / 1e6,
            "frac_hbm_peak": bytes_min / (ms * 1e-3) / hbm,
            "frac_copy_bw": bytes_min / (ms * 1e-3) / copy_bw,
            "TFLOPs": flops / ms / 1e9,
        }
        bm = moe_configs.get_moe_config(t, E, INTER, HIDDEN, TOPK).block_m
        row["align_ms"] = bench(partial(moe_align, ids, E, bm), graph=True)
        if hasattr(torch, "_grouped_mm") and t >= 64:
            try:
                row["grouped_mm_ms"] = bench(
                    lambda x=x, w=weights, i=ids: fused_moe_grouped_mm(x, w13, w2, w, i)
                )
            except Exception as exc:  # noqa: BLE001
                row["grouped_mm_error"] = repr(exc)[:200]
        if t <= 512 or t == 4096:
            row["torch_ms"] = bench(lambda x=x, w=weights, i=ids: ops.fused_moe(x, w13, w2, w, i), rep=50)
        rows.append(row)
        print(
            f"moe T={t:5d} experts={touched:3d}: {ms * 1e3:8.1f} us  {row['GBps']:6.0f} GB/s "
            f"({row['frac_hbm_peak']:.0%} of peak) {row['TFLOPs']:5.0f} TFLOP/s  align {row['align_ms'] * 1e3:5.1f} us  "
            f"grouped_mm {row.get('grouped_mm_ms', float('nan')) * 1e3:8.1f} us  "
            f"torch {row.get('torch_ms', float('nan')) * 1e3:8.1f} us"
        )
    results["moe"] = rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tune-moe", action="store_true")
    parser.add_argument("--tune-attn", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer MoE token counts")
    parser.add_argument("--moe-tokens", type=int, nargs="*", default=None, help="MoE token counts to run")
    parser.add_argument("--only", default="decode,prefill,small,moe")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    only = set(args.only.split(","))

    props = torch.cuda.get_device_properties(0)
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "has_grouped_mm": hasattr(torch, "_grouped_mm"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    hbm = peak_hbm()
    copy_bw = copy_bandwidth()
    results.update({"hbm_peak_Bps": hbm, "copy_Bps": copy_bw})
    print(f"{results['device']}  copy {copy_bw / 1e12:.2f} TB/s (datasheet {hbm / 1e12:.2f})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = [
        ("decode", lambda: bench_decode(results, hbm, copy_bw, args.tune_attn)),
        ("prefill", lambda: bench_prefill(results, args.tune_attn)),
        ("small", lambda: bench_small(results)),
        ("moe", lambda: bench_moe(results, hbm, copy_bw, args.tune_moe, args.quick, args.moe_tokens)),
    ]
    for name, fn in sections:
        if name not in only:
            continue
        t0 = time.time()
        fn()
        print(f"[{name} took {time.time() - t0:.0f} s]")
        (out / "kernels.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out / 'kernels.json'}")


if __name__ == "__main__":
    main()
