"""Why did the engine's batch-1 decode graph replay ~210 us per step slower than a freshly captured one?

Usage on a GPU machine: PYTHONPATH=. python3 bench/graph_capture_order.py CONFIG_DIR [--layers 48] [--probe-ops]
Default: the start-up graph's replay time after greedy and sampled requests, then after each part of what
a fresh capture does (an allocation, a pinned buffer, a tiny graph, an eager decode forward), then the
start-up and a fresh graph side by side, after a pause and sustained.
--probe-ops: after a new request's prefill, one eager launch at a time (torch ops, Triton kernels with and
without the PDL launch attribute, each kernel of layer 0's decode path) and the graph's replay time after it.
Found (H200, ninth session): not the capture: after any prefill the graph replays at ~2,581 us until some
kernel is launched eagerly with the PDL attribute (even an empty one), then at ~2,370 us; hence
qwenserve.kernels.pdl.prime_pdl before every decode graph replay.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from qwenserve.config import EngineConfig
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.engine.model_runner import DecodeGraphs
from qwenserve.engine.sampling_params import SamplingParams
from qwenserve.kernels.pdl import pdl_start, pdl_wait


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


def decode(engine: LLMEngine, context: int, steps: int = 12) -> torch.cuda.CUDAGraph:
    """Start a greedy request, run `steps` engine steps; the batch-1 graph they replayed."""
    rng = random.Random(context)
    params = SamplingParams(temperature=0.0, max_tokens=100000, ignore_eos=True)
    engine.add_request(f"r{rng.random()}", [rng.randrange(150000) for _ in range(context)], params)
    for _ in range(steps):
        engine.step()
    graphs = engine.runner.graphs
    return graphs.graphs[graphs.last_key]


def finish(engine: LLMEngine, params: SamplingParams, context: int = 512) -> None:
    """Run one request of `params` to its end."""
    rng = random.Random(7)
    engine.add_request(f"f{rng.random()}", [rng.randrange(150000) for _ in range(context)], params)
    while engine.has_unfinished():
        engine.step()


def probe_ops(engine: LLMEngine, context: int) -> None:
    """After a new request's prefill, run parts of an eager decode forward; the graph's replay time after each."""
    runner = engine.runner
    model, graphs = runner.model, runner.graphs
    layers = model.layers

    def fresh_request(note: str) -> torch.cuda.CUDAGraph:
        for rid in list(engine.requests):
            engine.abort(rid)
        graph = decode(engine, context)
        print(f"{note}: {replay_us(graph):.0f} us", flush=True)
        return graph

    def eager(bs: int, num_layers: int | None, logits: bool) -> None:
        key = graphs.last_key
        meta = graphs._meta(bs, graphs.short_context_len if key[1] else graphs.max_context_len)
        with torch.inference_mode():
            if num_layers is not None:
                model.layers = layers[:num_layers]
            try:
                hidden = model(graphs.input_ids[:bs], graphs.positions[:bs], meta)
            finally:
                model.layers = layers
            if logits:
                model.compute_logits(hidden)
        torch.cuda.synchronize()

    if KERNEL_PROBES:
        probe_kernels(engine, fresh_request, eager)
        return
    graph = fresh_request("after a new request's prefill")
    with torch.inference_mode():
        model.compute_logits(torch.randn(1, model.lm_head.weight.shape[1], device=runner.device, dtype=model.lm_head.weight.dtype))
    torch.cuda.synchronize()
    print(f"after an eager lm_head: {replay_us(graph):.0f} us", flush=True)
    for num_layers in (1, None):
        graph = fresh_request("after a new request's prefill")
        eager(1, num_layers, logits=False)
        print(f"after an eager forward of {num_layers if num_layers is not None else 'all'} layers: {replay_us(graph):.0f} us", flush=True)
    graph = fresh_request("after a new request's prefill")
    for _ in range(64):
        engine.step()
    print(f"after 64 more decode steps: {replay_us(graph):.0f} us", flush=True)


KERNEL_PROBES = True


@triton.jit
def _noop(x_ptr, PDL_MODE: tl.constexpr):
    pdl_start(PDL_MODE)
    pdl_wait(PDL_MODE)


def probe_kernels(engine: LLMEngine, fresh_request, eager) -> None:  # noqa: ANN001
    """After a prefill, one eager kernel of layer 0's decode path at a time; the graph's replay time after it."""
    runner = engine.runner
    model, graphs = runner.model, runner.graphs
    layer = model.layers[0]
    attn, ops = layer.self_attn, layer.self_attn.ops
    key = graphs.last_key
    meta = graphs._meta(1, graphs.short_context_len if key[1] else graphs.max_context_len)
    ids, positions = graphs.input_ids[:1], graphs.positions[:1]
    torch.inference_mode().__enter__()  # a benchmark script: no autograd from here on
    x = model.embed_tokens(ids)
    h = layer.input_layernorm(x)
    qkv = ops.linear_unreduced(h, attn.qkv_proj.weight)

    def qk_norm():  # noqa: ANN202
        return ops.qk_norm_rope_cache(qkv, attn.q_norm.weight, attn.k_norm.weight, model.cos_sin_cache, positions,
                                      attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.q_norm.eps, attn.k_cache,
                                      attn.v_cache, meta.slot_mapping)  # fmt: skip

    q = qk_norm()
    att = ops.paged_attention(q, attn.k_cache, attn.v_cache, meta, attn.scale).reshape(1, attn.q_size)
    o = ops.linear_unreduced(att, attn.o_proj.weight)
    norm, mlp = layer.post_attention_layernorm, layer.mlp
    probes = {
        "a torch multiply": lambda: x * 2,
        "rms_norm": lambda: layer.input_layernorm(x),
        "qkv GEMV": lambda: ops.linear_unreduced(h, attn.qkv_proj.weight),
        "q/k norm + rope + KV write": qk_norm,
        "decode attention + merge": lambda: ops.paged_attention(q, attn.k_cache, attn.v_cache, meta, attn.scale),
        "o_proj GEMV": lambda: ops.linear_unreduced(att, attn.o_proj.weight),
        "norm + routed MoE": lambda: ops.norm_routed_moe(o, x, norm.weight, norm.eps, mlp.gate.weight, mlp.w13,
                                                         mlp.w2, mlp.top_k, mlp.norm_topk_prob),  # fmt: skip
    }
    buf = torch.zeros(1, device=runner.device)
    graph = fresh_request("after a new request's prefill")
    for name, fn in {
        "no-op PDL kernel (mode 1)": lambda: _noop[(1,)](buf, PDL_MODE=1, launch_pdl=True),
        "torch multiply": lambda: x * 2,
        "rms_norm": lambda: layer.input_layernorm(x),
        "no-op PDL kernel (mode 1) again": lambda: _noop[(1,)](buf, PDL_MODE=1, launch_pdl=True),
        "engine step": engine.step,
        "no-op kernel, launch_pdl only (mode 0)": lambda: _noop[(1,)](buf, PDL_MODE=0, launch_pdl=True),
        "no-op kernel, no PDL": lambda: _noop[(1,)](buf, PDL_MODE=0),
    }.items():
        fn()
        torch.cuda.synchronize()
        print(f"  then {name}: {replay_us(graph):.0f} us", flush=True)
    graph = fresh_request("after a new request's prefill")
    _noop[(1,)](buf, PDL_MODE=0, launch_pdl=True)
    torch.cuda.synchronize()
    print(f"  then a no-op kernel, launch_pdl only (mode 0): {replay_us(graph):.0f} us", flush=True)
    for name, fn in probes.items():
        graph = fresh_request("after a new request's prefill")
        with torch.inference_mode():
            fn()
        torch.cuda.synchronize()
        print(f"  after an eager {name}: {replay_us(graph):.0f} us", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--probe-ops", action="store_true", help="which eager op after a prefill restores the graph's speed")
    p.add_argument("--kv-gib", type=float, default=4.0, help="0: what the GPU's memory leaves")
    args = p.parse_args()
    common = dict(model=shrunk_config(args.config, args.layers), load_format="dummy", max_model_len=args.context + 2048,
                  max_num_seqs=args.max_num_seqs, kv_cache_memory=int(args.kv_gib * 2**30) or None)  # fmt: skip
    engine = LLMEngine(EngineConfig(**common))
    start_up = decode(engine, args.context)
    print(f"start-up graph, first greedy request: {replay_us(start_up):.0f} us", flush=True)
    for name, params in (
        ("greedy", SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)),
        ("sampled", SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, seed=1,
                                   max_tokens=32, ignore_eos=True)),  # fmt: skip
    ):
        for rid in list(engine.requests):
            engine.abort(rid)
        finish(engine, params)
        start_up = decode(engine, args.context)
        print(f"start-up graph after a {name} request: {replay_us(start_up):.0f} us", flush=True)
    if args.probe_ops:
        probe_ops(engine, args.context)
        return
    graphs = {"start-up capture": start_up}
    runner = engine.runner
    old = runner.graphs
    # What a fresh capture does, one part at a time (cumulative): which part speeds up the start-up graph?
    keep = []
    keep.append(torch.empty(256 << 20, dtype=torch.uint8, device=runner.device))
    print(f"after a 256 MiB allocation: {replay_us(start_up):.0f} us", flush=True)
    keep.append(torch.zeros(4, 256, dtype=torch.int64, pin_memory=True))
    print(f"after a pinned allocation: {replay_us(start_up):.0f} us", flush=True)
    tiny, x = torch.cuda.CUDAGraph(), torch.ones(1024, device=runner.device)
    with torch.cuda.graph(tiny):
        keep.append(x * 2)
    tiny.replay()
    print(f"after a tiny graph: {replay_us(start_up):.0f} us", flush=True)
    for bs in (1, max(s for s in old.sizes if s <= 8)):
        with torch.inference_mode():
            runner.model.compute_logits(runner.model(old.input_ids[:bs], old.positions[:bs], old._meta(bs, old.short_context_len)))
        torch.cuda.synchronize()
        print(f"after an eager decode forward of batch {bs}: {replay_us(start_up):.0f} us", flush=True)
    runner.graphs = DecodeGraphs(runner.model, args.max_num_seqs, old.max_blocks, runner.block_size, runner.device)
    for _ in range(3):  # the same request on: its steps load the fresh graph's inputs
        engine.step()
    graphs["fresh capture, same engine"] = runner.graphs.graphs[runner.graphs.last_key]
    for name, g in (("start-up", old), ("fresh", runner.graphs)):
        key = g.last_key
        print(f"{name}: logits at {g.outputs[key].data_ptr():#x}, inputs at {g.packed.data_ptr():#x}", flush=True)
    for _ in range(args.rounds):
        print({name: round(replay_us(g)) for name, g in graphs.items()}, flush=True)
    # Clocks: a GPU rested by a pause may replay faster for a while. Each graph after 1 s idle, then
    # each sustained for ~2 s in windows of 100 replays: if the start-up graph catches up once both
    # are warm, the gap is the GPU's boost, not the capture.
    for name, g in graphs.items():
        time.sleep(1.0)
        print(f"{name}, after 1 s idle: {replay_us(g):.0f} us", flush=True)
    for name, g in graphs.items():
        windows = [round(replay_us(g, 100)) for _ in range(4)]
        print(f"{name}, sustained windows: {windows}", flush=True)


if __name__ == "__main__":
    main()
