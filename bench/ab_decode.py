"""A/B of module settings inside the real decode graph: each variant re-captures the graph and replays it.

Usage on a GPU machine:
    python3 bench/ab_decode.py CONFIG_DIR [--context 512 32768] [--batch 1 4] \
        --variant fused: --variant unfused:qwenserve.kernels.moe.NORM_ROUTE_FUSED=False
A variant is NAME:SETTING,SETTING,... where SETTING is dotted.path.ATTR=python-literal (a module
attribute, or an attribute of an object reached from a module, e.g.
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction=False), or moe_table.T=(fields of
MoEConfig) for the MoE tile table's row of steps up to T tokens. Variants run interleaved
for --rounds rounds so clock drift hits them all alike; the median step time of each is printed.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tune_decode_moe import KEY, replay_ms, start_batch  # noqa: E402

from qwenserve.config import EngineConfig  # noqa: E402
from qwenserve.engine.llm_engine import LLMEngine  # noqa: E402
from qwenserve.kernels import moe_configs  # noqa: E402
from qwenserve.kernels.moe_configs import MoEConfig  # noqa: E402


def resolve(path: str) -> tuple[object, str]:
    """(owner object, attribute name) for a dotted path: the longest importable module prefix, then getattr."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:-1]:
            owner = getattr(owner, name)
        return owner, parts[-1]
    raise ValueError(f"no importable module in {path!r}")


class MoETableRows:
    """The rows of this device's MoE tile table for the Qwen3-Coder shape as attributes: `moe_table.1` is
    the row for steps of 1 token, set with a tuple of MoEConfig's fields (block_m, n1, k1, warps1, ...)."""

    def __getattr__(self, max_tokens: str) -> MoEConfig:
        return dict(moe_configs._device_tables()[KEY])[int(max_tokens)]

    def __setattr__(self, max_tokens: str, cfg: MoEConfig | tuple) -> None:
        cfg = cfg if isinstance(cfg, MoEConfig) else MoEConfig(*cfg)
        rows = [(t, cfg if t == int(max_tokens) else c) for t, c in moe_configs._device_tables()[KEY]]
        moe_configs.set_moe_table(KEY, rows, moe_configs.GROUPED_MM_MIN_TOKENS)


def parse_variant(text: str) -> tuple[str, list[tuple[object, str, object]]]:
    name, _, settings = text.partition(":")
    parsed = []
    for item in filter(None, re.split(r",(?=[\w.]+=)", settings)):  # commas inside a literal stay
        path, _, value = item.partition("=")
        path = path.strip()
        if path.startswith("moe_table."):
            owner, attr = MoETableRows(), path.removeprefix("moe_table.")
        else:
            owner, attr = resolve(path)
        parsed.append((owner, attr, ast.literal_eval(value.strip())))
    return name, parsed


def measure(engine: LLMEngine, batch: int, settings: list[tuple[object, str, object]]) -> float:
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in settings]
    try:
        for owner, attr, value in settings:
            setattr(owner, attr, value)
        return replay_ms(engine, batch)
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--context", type=int, nargs="*", default=[512])
    p.add_argument("--batch", type=int, nargs="*", default=[1])
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    engine = LLMEngine(EngineConfig(model=args.config, load_format="dummy", max_model_len=max(args.context) + 1024,
                                    max_num_seqs=max(args.batch)))
    for context in args.context:
        for batch in args.batch:
            start_batch(engine, batch, context)
            for _ in range(3):
                replay_ms(engine, batch)  # settle clocks: the first replays after a start run fast
            times: dict[str, list[float]] = {name: [] for name, _ in variants}
            for round_ in range(args.rounds):
                # Each round starts one variant later: the first graph measured in a round reads 20-50 us
                # slower at batch 1 (H200), which in a fixed order biased every A/B against the baseline.
                for name, settings in variants[round_ % len(variants):] + variants[: round_ % len(variants)]:
                    times[name].append(measure(engine, batch, settings))
            base = statistics.median(times[variants[0][0]])
            for name, _ in variants:
                ms = statistics.median(times[name])
                print(f"ctx {context} batch {batch} {name}: step {ms * 1000:.1f} us ({(ms - base) * 1000:+.1f}), "
                      f"{batch / ms * 1000:.0f} tok/s; runs {[round(t * 1000, 1) for t in times[name]]}", flush=True)


if __name__ == "__main__":
    main()
