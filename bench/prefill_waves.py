"""Does a follow-up turn's prefill chunk leave SMs idle, and do split keys fill them?

1. Copies: the Triton prefill kernel on 1-6 copies of one (chunk, prefix) shape in one launch, each copy
   with its own blocks. If a copy costs less when there are more, one chunk's launch was short of
   programs (wave quantization).
2. Splits: one chunk (or a mixed step) at each num_splits, beside the count prefill_num_splits picks;
   every output checked against the unsplit one.

Usage on a GPU machine: python3 bench/prefill_waves.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenserve.kernels import attention as attn  # noqa: E402
from qwenserve.model.ops import AttentionMetadata  # noqa: E402

H, KVH, D, BS = 32, 4, 128, 16
# (new tokens, prefix) per sequence; the last case is 31 decode rows at 20k beside a follow-up chunk
SPLIT_CASES = [
    [(857, 16384)],
    [(300, 40000)],
    [(100, 20000)],
    [(1500, 60000)],
    [(2048, 30000)],
    [(4000, 100000)],
    [(857, 16384)] + [(1, 20000)] * 31,
]


def make(seqs: list[tuple[int, int]]) -> tuple:
    """Packed queries and a paged cache for sequences of (new tokens, prefix), each with its own blocks."""
    ctxs = [q_len + prefix for q_len, prefix in seqs]
    widths = [-(-c // BS) for c in ctxs]
    k_cache = torch.randn(sum(widths) + 1, BS, KVH, D, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(sum(widths), device="cuda").to(torch.int32) + 1
    tables = torch.zeros(len(seqs), max(widths), dtype=torch.int32, device="cuda")
    used = 0
    for i, w in enumerate(widths):
        tables[i, :w] = perm[used : used + w]
        used += w
    starts = [0]
    for q_len, _ in seqs:
        starts.append(starts[-1] + q_len)
    q = torch.randn(starts[-1], H, D, device="cuda", dtype=torch.bfloat16)
    context_lens = torch.tensor(ctxs, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, tables, context_lens, torch.tensor(starts, dtype=torch.int32, device="cuda"), D**-0.5


def time_ms(args: tuple, splits: int) -> float:
    return triton.testing.do_bench(lambda: attn.paged_prefill_attention(*args, num_splits=splits), warmup=25, rep=200)


def engine_splits(seqs: list[tuple[int, int]], step: tuple) -> int:
    """The split count the engine's attention picks for this step (from its host-side lengths)."""
    q, k_cache, _, tables, context_lens, starts, _ = step
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(q.shape[0], dtype=torch.int64, device=q.device), block_tables=tables,
        context_lens=context_lens, query_start_loc=starts, max_query_len=max(n for n, _ in seqs),
        max_context_len=int(context_lens.max()), is_decode_only=False,
        host_query_start_loc=starts.tolist(), host_context_lens=context_lens.tolist(),
    )
    return attn._prefill_splits(q, k_cache, meta)


def programs(args: tuple) -> int:
    """Programs of the step's unsplit launch."""
    q, tables = args[0], args[3]
    block_q = attn.prefill_tile(attn.PREFILL_BLOCK_M, H // KVH)[1]
    return attn.prefill_query_tiles(q.shape[0], tables.shape[0], block_q) * KVH


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--cases", help="one sequence per case, NEW:PREFIX,... (default: SPLIT_CASES)")
    p.add_argument("--no-copies", dest="copies", action="store_false")
    args = p.parse_args()
    cases = SPLIT_CASES
    if args.cases:
        cases = [[tuple(int(x) for x in case.split(":"))] for case in args.cases.split(",")]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}: {sms} SMs")
    results: dict = {"device": torch.cuda.get_device_name(), "sms": sms, "copies": [], "splits": []}
    for copies in (1, 2, 3, 4, 6) if args.copies else ():
        step = make([(857, 16384)] * copies)
        ms = time_ms(step, 1)
        results["copies"].append({"copies": copies, "programs": programs(step), "ms": ms})
        print(f"{copies} copies of 857 over 16,384 ({programs(step)} programs): {ms:.3f} ms, {ms / copies:.3f} a copy")
    for seqs in cases:
        step = make(seqs)
        ref = attn.paged_prefill_attention(*step).float()
        chosen = engine_splits(seqs, step)
        row = {"seqs": seqs[:2] + ([f"... {len(seqs)} in all"] if len(seqs) > 2 else []), "programs": programs(step),
               "chosen": chosen, "ms": {}, "max_rel_err": 0.0}
        for splits in (1, *attn.PREFILL_SPLIT_CHOICES):
            out = attn.paged_prefill_attention(*step, num_splits=splits).float()
            err = ((out - ref).norm() / ref.norm()).item()
            row["max_rel_err"] = max(row["max_rel_err"], err)
            row["ms"][splits] = time_ms(step, splits)
        results["splits"].append(row)
        times = ", ".join(f"{s}: {ms:.3f}" for s, ms in row["ms"].items())
        print(f"{row['seqs']} ({row['programs']} programs): ms by splits {times}; picks {chosen} "
              f"({row['ms'][chosen] / row['ms'][1] - 1:+.0%}); err {row['max_rel_err']:.1e}", flush=True)
        del step, ref
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "prefill_waves.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
