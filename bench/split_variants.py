"""Why did generic loop bounds make the unsplit prefill launch ~20 % slower, and does a split launch pay the
same? Variants of the kernel's loop bounds, each timed on the same shapes (splits forced), with the PTX of
the unsplit launch as it is and with generic bounds kept for a diff.

Usage on a GPU machine: python3 bench/split_variants.py [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import re
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.prefill_waves import make  # noqa: E402
from qwenserve.kernels import attention as attn  # noqa: E402

ORIGINAL = attn._prefill_kernel
SPLIT_BRANCH = """        full_tiles = full_end // BLOCK_N
        tiles_per_split = tl.cdiv(full_tiles, NUM_SPLITS)
        lo = tl.minimum(split * tiles_per_split, full_tiles) * BLOCK_N
        hi = tl.minimum((split + 1) * tiles_per_split, full_tiles) * BLOCK_N
        tail_start = tl.where(split == NUM_SPLITS - 1, full_end, kv_end)
"""
LOOP_HEAD = """    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
"""
GENERIC = ("    if NUM_SPLITS == 1:\n        # Loop", "    if NUM_SPLITS == 0:\n        # Loop")
# the whole-tile loop's block-table index and in-block offset from the tile start (a multiple of BLOCK_N, so
# of BLOCK_SIZE when BLOCK_SIZE divides it) and offs_n, rather than from their sum
DECOMPOSED = (
    "        n = start + offs_n\n        blk = tl.load(bt_row + n // BLOCK_SIZE).to(tl.int64)\n"
    "        kv_off = blk * stride_cb + (n % BLOCK_SIZE) * stride_cs + kvh * stride_ch\n",
    "        blk = tl.load(bt_row + start // BLOCK_SIZE + offs_n // BLOCK_SIZE).to(tl.int64)\n"
    "        kv_off = blk * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs + kvh * stride_ch\n",
)
ASSUME = (SPLIT_BRANCH, SPLIT_BRANCH + "        tl.assume(lo >= 0)\n        tl.assume(hi >= lo)\n")
VARIANTS = {
    "current": [],
    # the split bounds for every launch, the unsplit one too (the ~20 % slower kernel of dc878bc)
    "generic": [GENERIC],
    "multiple_of": [(SPLIT_BRANCH, SPLIT_BRANCH + "        lo = tl.multiple_of(lo, BLOCK_N)\n"
                     "        hi = tl.multiple_of(hi, BLOCK_N)\n")],
    "zero_based": [(LOOP_HEAD, "    for i in range(0, (hi - lo) // BLOCK_N):\n        n = lo + i * BLOCK_N + offs_n\n")],
    "generic_decomposed": [GENERIC, DECOMPOSED],
    "generic_assume": [GENERIC, ASSUME],
    "current_decomposed": [DECOMPOSED],
}
CASES = {"857/16384": [(857, 16384)], "300/40000": [(300, 40000)], "8192 cold": [(8192, 0)], "2048/8192": [(2048, 8192)]}
SPLITS = {"857/16384": (1, 2, 8), "300/40000": (1, 8), "8192 cold": (1, 2), "2048/8192": (1, 2)}


def variant_kernel(name: str, edits: list[tuple[str, str]], workdir: Path):
    """The prefill kernel with `edits` applied, compiled from its own module file (Triton reads the source)."""
    src = inspect.getsource(ORIGINAL.fn)
    src = src[re.search(r"^def ", src, re.MULTILINE).start():]
    for old, new in edits:
        assert old in src, (name, old)
        src = src.replace(old, new, 1)
    header = "import triton\nimport triton.language as tl\n_NEG_BIG = tl.constexpr(-1.0e30)\n\n"
    decorator = '@triton.jit(do_not_specialize=["num_seqs", "stride_bt", "dense_min_query", "dense_min_pairs2"])\n'
    path = workdir / f"variant_{name}.py"
    path.write_text(header + decorator + src)
    spec = importlib.util.spec_from_file_location(f"variant_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._prefill_kernel


class Capture:
    """Stands in for the kernel in attention.py and keeps the last compiled kernel it launched."""

    def __init__(self, fn) -> None:
        self.fn, self.compiled = fn, None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.compiled = self.fn[grid](*args, **kwargs)
            return self.compiled

        return launch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path("/tmp/split_variants")
    workdir.mkdir(exist_ok=True)
    sys.path.insert(0, str(workdir))
    steps = {case: make(seqs) for case, seqs in CASES.items()}
    refs = {case: attn.paged_prefill_attention(*step).float() for case, step in steps.items()}
    results: dict = {"device": torch.cuda.get_device_name()}
    original = attn._prefill_kernel
    for name, edits in VARIANTS.items():
        capture = Capture(variant_kernel(name, edits, workdir))
        attn._prefill_kernel = capture
        results[name] = {}
        for case, step in steps.items():
            for splits in SPLITS[case]:
                try:
                    got = attn.paged_prefill_attention(*step, num_splits=splits).float()
                except Exception as exc:  # a variant that does not compile is a result too
                    results[name][f"{case} s{splits}"] = {"error": repr(exc)[:500]}
                    print(f"{name} {case} splits {splits}: {exc!r}"[:800], flush=True)
                    continue
                err = ((got - refs[case]).norm() / refs[case].norm()).item()
                if name in ("current", "generic") and case == "857/16384" and splits == 1:
                    (out / f"{name}_s{splits}.ptx").write_text(capture.compiled.asm["ptx"])
                ms = triton.testing.do_bench(
                    lambda step=step, splits=splits: attn.paged_prefill_attention(*step, num_splits=splits),
                    warmup=25, rep=200)
                results[name][f"{case} s{splits}"] = {"ms": ms, "err": err}
                print(f"{name:12s} {case:10s} splits {splits}: {ms:.3f} ms (err {err:.1e})", flush=True)
    attn._prefill_kernel = original
    (out / "split_variants.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
