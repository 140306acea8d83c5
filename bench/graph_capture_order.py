"""Why did the engine's batch-1 decode graph replay ~210 us per step slower than a freshly captured one?

Usage on a GPU machine: PYTHONPATH=. python3 bench/graph_capture_order.py CONFIG_DIR [--layers 48] [--with-prime]
After each new request's prefill, one eager launch at a time (torch ops, Triton kernels with and without the
PDL launch attribute, an eager decode forward, each kernel of layer 0's decode path), and the replay time of
the engine's start-up batch-1 graph after it; then the start-up graph against a fresh capture, after a pause
and sustained (the GPU's clocks).
Found (H200, ninth session): not the capture and not the clocks. After any prefill the graph replays at
~2,581 us until some kernel is launched eagerly with the PDL attribute (even an empty one), then at ~2,370 us,
and torch or Triton launches without the attribute do not undo it. Hence qwenserve.kernels.pdl.prime_pdl
before every decode graph replay; this script turns it off unless --with-prime (which should read fast
throughout). The figures in docs/BENCHMARKS.md came from this script's earlier form (commit e90e438); it was
folded into this shape after the runs and has not run on a GPU since.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.language as tl

from qwenserve.config import EngineConfig
from qwenserve.engine.decode_graphs import DecodeGraphs
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.engine.sampling_params import SamplingParams
from qwenserve.kernels import pdl

_REQUESTS = itertools.count()


@triton.jit
def _noop(x_ptr, PDL_MODE: tl.constexpr):
    pdl.pdl_start(PDL_MODE)
    pdl.pdl_wait(PDL_MODE)


def shrunk_config(config_dir: str, layers: int) -> str:
    """A copy of the config directory with `layers` decoder layers."""
    out = Path(tempfile.mkdtemp(prefix="qwenserve-shrunk-"))
    for f in Path(config_dir).iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    cfg = json.loads((out / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


def replay_us(graph: torch.cuda.CUDAGraph, steps: int = 200) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / steps


def new_request(engine: LLMEngine, context: int, steps: int = 12) -> torch.cuda.CUDAGraph:
    """Abort what runs, start a greedy request (its prefill runs eagerly), run `steps` engine steps; the
    batch-1 graph they replayed."""
    for rid in list(engine.requests):
        engine.abort(rid)
    rng = random.Random(next(_REQUESTS))  # a new prompt each time: its prefill is computed, not cached
    params = SamplingParams(temperature=0.0, max_tokens=100000, ignore_eos=True)
    engine.add_request(f"r{rng.random()}", [rng.randrange(150000) for _ in range(context)], params)
    for _ in range(steps):
        engine.step()
    graphs = engine.runner.graphs
    return graphs.graphs[graphs.last_key]


def layer0_probes(engine: LLMEngine) -> dict[str, Callable[[], object]]:
    """Eager launches of layer 0's decode path on the graphs' current inputs, by name."""
    model, graphs = engine.runner.model, engine.runner.graphs
    layer = model.layers[0]
    attn, ops = layer.self_attn, layer.self_attn.ops
    norm, mlp = layer.post_attention_layernorm, layer.mlp
    meta = graphs._meta(1, graphs.short_context_len if graphs.last_key[1] else graphs.max_context_len)
    x = model.embed_tokens(graphs.input_ids[:1])
    h = layer.input_layernorm(x)
    qkv = ops.linear_unreduced(h, attn.qkv_proj.weight)

    def qk_norm() -> torch.Tensor:
        return ops.qk_norm_rope_cache(qkv, attn.q_norm.weight, attn.k_norm.weight, model.cos_sin_cache,
                                      graphs.positions[:1], attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                      attn.q_norm.eps, attn.k_cache, attn.v_cache, meta.slot_mapping)  # fmt: skip

    q = qk_norm()
    att = ops.paged_attention(q, attn.k_cache, attn.v_cache, meta, attn.scale).reshape(1, attn.q_size)
    o = ops.linear_unreduced(att, attn.o_proj.weight)
    flag = torch.zeros(1, device=x.device)
    return {
        "a torch multiply": lambda: x * 2,
        "the Triton RMSNorm (no PDL)": lambda: layer.input_layernorm(x),
        "an empty kernel without PDL": lambda: _noop[(1,)](flag, PDL_MODE=0),
        "an empty kernel with the PDL attribute": lambda: _noop[(1,)](flag, PDL_MODE=0, launch_pdl=True),
        "the lm_head": lambda: model.compute_logits(h),
        "a decode forward of batch 1": lambda: model(graphs.input_ids[:1], graphs.positions[:1], meta),
        "the qkv GEMV": lambda: ops.linear_unreduced(h, attn.qkv_proj.weight),
        "q/k norm + rope + KV write": qk_norm,
        "decode attention + merge": lambda: ops.paged_attention(q, attn.k_cache, attn.v_cache, meta, attn.scale),
        "the o_proj GEMV": lambda: ops.linear_unreduced(att, attn.o_proj.weight),
        "norm + routed MoE": lambda: ops.norm_routed_moe(o, x, norm.weight, norm.eps, mlp.gate.weight, mlp.w13,
                                                         mlp.w2, mlp.top_k, mlp.norm_topk_prob),  # fmt: skip
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--kv-gib", type=float, default=4.0, help="0: what the GPU's memory leaves")
    p.add_argument("--with-prime", action="store_true", help="keep the engine's prime_pdl before each replay")
    args = p.parse_args()
    if not args.with_prime:
        pdl.prime_pdl = lambda anchor: None  # DecodeGraphs binds it when the engine captures
    config = EngineConfig(model=shrunk_config(args.config, args.layers), load_format="dummy",
                          max_model_len=args.context + 2048, max_num_seqs=args.max_num_seqs,
                          kv_cache_memory=int(args.kv_gib * 2**30) or None)  # fmt: skip
    engine = LLMEngine(config)
    torch.inference_mode().__enter__()  # a benchmark script: no autograd from here on
    print(f"start-up graph after a request: {replay_us(new_request(engine, args.context)):.0f} us", flush=True)
    for name, launch in layer0_probes(engine).items():
        graph = new_request(engine, args.context)
        before = replay_us(graph)
        launch()
        torch.cuda.synchronize()
        print(f"after a prefill {before:.0f} us; then {name}: {replay_us(graph):.0f} us", flush=True)
    start_up = new_request(engine, args.context)
    runner = engine.runner
    runner.graphs = DecodeGraphs(runner.model, args.max_num_seqs, runner.graphs.max_blocks, runner.block_size,
                                 runner.device)  # fmt: skip
    for _ in range(3):  # the same request on: its steps load the fresh graph's inputs
        engine.step()
    graphs = {"start-up capture": start_up, "fresh capture": runner.graphs.graphs[runner.graphs.last_key]}
    print({name: round(replay_us(g)) for name, g in graphs.items()}, flush=True)
    # A GPU rested by a pause may replay faster for a while: each graph after 1 s idle, then sustained.
    for name, g in graphs.items():
        time.sleep(1.0)
        print(f"{name}, after 1 s idle: {replay_us(g):.0f} us", flush=True)
    for name, g in graphs.items():
        print(f"{name}, sustained windows: {[round(replay_us(g, 100)) for _ in range(4)]}", flush=True)


if __name__ == "__main__":
    main()
