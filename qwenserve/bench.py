"""`qwenserve bench`: end-to-end GPU benchmark of the engine against Transformers, with roofline limits.

Runs the full-size Qwen3-Coder-30B-A3B shape on dummy weights (normal, std =
initializer_range, drawn on the GPU) and measures, in one process and on the same
weights: batch-1 decode at 512 and 32k context, cold prefill TTFT at 2k / 8k and on
the real 20k-token qwen-code prompt, the cached follow-up turn, output throughput at
8 / 32 / 64 concurrent streams, peak memory, and the Transformers `generate()`
baseline (which shares our weight tensors, so both fit on one GPU). Each figure is
also given as a fraction of its physical limit, computed here from the model shape
and the device's HBM bandwidth and bf16 peak.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from qwenserve.config import EngineConfig, ModelConfig
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.engine.sampling_params import GENERATION_CONFIG_FIELDS, SamplingParams

# (HBM bytes/s, dense bf16 FLOP/s) by device name; H100 SXM and H200 share the compute.
DEVICE_PEAKS = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12)}
# The real model's config.json and two real qwen-code requests, kept with the tests.
_FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
DEFAULT_CONFIG = _FIXTURES / "qwen3-coder-30b-a3b-instruct"
DEFAULT_FIXTURES = _FIXTURES / "qwen-code-0.24.4"


# -- roofline arithmetic -------------------------------------------------------------


def expert_bytes(cfg: ModelConfig, elem: int = 2) -> int:
    """Bytes of one expert's gate, up and down projections."""
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size * elem


def dense_bytes_per_step(cfg: ModelConfig, elem: int = 2) -> int:
    """Weights every decode step reads whatever the routing: attention, router, norms, lm_head."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d + cfg.num_attention_heads * d * h
    per_layer = attn + h * cfg.num_experts + 2 * h + 2 * d
    return (cfg.num_hidden_layers * per_layer + cfg.vocab_size * h) * elem


def expected_experts_touched(cfg: ModelConfig, batch: int) -> float:
    """Distinct experts per layer for `batch` tokens under uniform routing: E (1 - (1 - k/E)^B)."""
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    return e * (1 - (1 - k / e) ** batch)


def kv_bytes_per_token(cfg: ModelConfig, elem: int = 2) -> int:
    """Bytes of K and V one token holds in the cache, over all layers."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem


def decode_step_bytes(cfg: ModelConfig, batch: int, context: int) -> float:
    """Bytes one decode step reads: dense weights, the experts a batch this size touches, its KV."""
    experts = expected_experts_touched(cfg, batch) * cfg.num_hidden_layers * expert_bytes(cfg)
    return dense_bytes_per_step(cfg) + experts + batch * context * kv_bytes_per_token(cfg)


def prefill_flops(cfg: ModelConfig, new_tokens: int, cached: int = 0) -> float:
    """Matmul FLOPs of a prefill: active weights per token plus causal attention scores and values."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn_w = h * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d + cfg.num_attention_heads * d * h
    active = cfg.num_hidden_layers * (attn_w + h * cfg.num_experts + cfg.num_experts_per_tok * 3 * h * cfg.moe_intermediate_size)
    weights = 2 * new_tokens * active + 2 * h * cfg.vocab_size  # logits only for the last token
    # Each new token at position p attends to p keys: QK^T and PV are 2 * 2 * heads * d FLOPs per key.
    keys = new_tokens * cached + new_tokens * (new_tokens + 1) / 2
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * d * keys
    return weights + attn


# -- measurement helpers ------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_prompt(n: int, rng: random.Random, vocab: int = 150000) -> list[int]:
    """`n` random token ids below `vocab` (the prompts' content does not matter to the timing)."""
    return [rng.randrange(0, vocab) for _ in range(n)]


def run_requests(
    engine: LLMEngine, prompts: list[list[int]], max_tokens: int, sampling: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Submit all prompts at once, step to completion; returns timings (seconds) and token counts.

    Greedy unless `sampling` gives SamplingParams fields."""
    params = SamplingParams(**(sampling or {"temperature": 0.0}), max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    ids = []
    for i, p in enumerate(prompts):
        rid = f"bench-{time.monotonic_ns()}-{i}"
        engine.add_request(rid, p, params)
        ids.append(rid)
    first: dict[str, float] = {}
    token_times: list[float] = []
    cached = generated = 0
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            if out.token_ids:
                first.setdefault(out.request_id, now)
                token_times.append(now)
            if out.finished:
                cached += out.num_cached_tokens
                generated += out.num_generated_tokens
    end = time.perf_counter()
    ttfts = [first[r] - start for r in ids]
    return {"wall_s": end - start, "ttft_s": ttfts, "cached_tokens": cached, "generated_tokens": generated,
            "first_token_at": min(first.values()) - start, "token_times": token_times}


def decode_speed(
    engine: LLMEngine, context: int, new_tokens: int, rng: random.Random, sampling: dict[str, Any] | None = None
) -> dict[str, float]:
    """Batch-1 decode tok/s after a `context`-token prompt (time between the first and last token)."""
    run_requests(engine, [random_prompt(context, rng)], 4, sampling)  # same shapes once: JIT compiles stay out
    res = run_requests(engine, [random_prompt(context, rng)], new_tokens, sampling)
    times = res["token_times"]
    tok_s = (len(times) - 1) / (times[-1] - times[0])
    return {"context": context, "tok_s": tok_s, "ttft_s": res["ttft_s"][0]}


def model_sampling(config_dir: Path) -> dict[str, Any]:
    """The sampling a client that sends no sampling fields gets (qwen-code sends none): the
    model's generation_config.json defaults, as the server applies them."""
    from qwenserve.model.loader import read_generation_config

    gen = read_generation_config(config_dir)
    sampling = {name: gen[name] for name in GENERATION_CONFIG_FIELDS if name in gen}
    if gen.get("do_sample") is False:
        sampling["temperature"] = 0.0
    return sampling | {"seed": 0}


def render_fixture(engine: LLMEngine, path: Path) -> list[int]:
    """Token ids of a real qwen-code request, rendered as the server renders it."""
    body = json.loads(path.read_text())
    try:
        from qwenserve.api.chat import normalize_messages, normalize_tools, render_chat
        from qwenserve.api.protocol import ChatCompletionRequest
    except ImportError:  # a GPU box without the HTTP extras: the same normalisation, minus validation
        from qwenserve.demo.build import openai_to_template

        text = engine.tokenizer.apply_chat_template(
            openai_to_template(body["messages"]), tools=body.get("tools"), add_generation_prompt=True, tokenize=False
        )
    else:
        req = ChatCompletionRequest.model_validate(body)
        text = render_chat(engine.tokenizer, normalize_messages(req.messages), normalize_tools(req.tools))
    return engine.tokenizer.encode(text, add_special_tokens=False)


def hf_baseline(
    engine: LLMEngine, config_dir: Path, context: int, new_tokens: int, repeats: int, rng: random.Random
) -> dict:
    """Transformers generate() at batch 1 on our very weight tensors (zero-copy views).

    Its speed is bound by Python and launch overheads, so it swings between runs: it is timed
    `repeats` times and the median is the figure (each run is kept in the JSON)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=engine.dtype)
    hf.load_state_dict(hf_state_dict(engine), assign=True, strict=False)
    rotary = hf.model.rotary_emb
    with torch.device("cpu"):  # its buffers were left on meta; rebuild them for real
        hf.model.rotary_emb = type(rotary)(config=hf.config).to(engine.device)
    hf.eval()
    ids = torch.tensor([random_prompt(context, rng)], device=engine.device)

    def timed(n: int) -> float:
        _sync()
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        _sync()
        return time.perf_counter() - t

    timed(new_tokens + 1)  # warm-up: the first long generate() also grows its caches and allocator pools
    runs = []
    for _ in range(repeats):
        prefill_only, full = timed(1), timed(new_tokens + 1)
        runs.append(new_tokens / (full - prefill_only))
    return {"context": context, "tok_s": statistics.median(runs), "tok_s_runs": runs, "new_tokens": new_tokens}


def hf_state_dict(engine: LLMEngine) -> dict[str, torch.Tensor]:
    """Our parameters under Transformers 5's Qwen3-MoE names (views: nothing is copied)."""
    model, state = engine.model, {}
    state["model.embed_tokens.weight"] = model.embed_tokens.weight
    state["model.norm.weight"] = model.norm.weight
    state["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        attn = layer.self_attn
        q, k, v = attn.qkv_proj.weight.split([attn.q_size, attn.kv_size, attn.kv_size])
        state |= {p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                  p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": attn.o_proj.weight,
                  p + "self_attn.q_norm.weight": attn.q_norm.weight, p + "self_attn.k_norm.weight": attn.k_norm.weight,
                  p + "input_layernorm.weight": layer.input_layernorm.weight,
                  p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
                  p + "mlp.gate.weight": layer.mlp.gate.weight,
                  p + "mlp.experts.gate_up_proj": layer.mlp.w13, p + "mlp.experts.down_proj": layer.mlp.w2}
    return state


# -- the benchmark ----------------------------------------------------------------------------


def cap_memory(gib: float) -> float:
    """Let this process use only `gib` GiB of the GPU, as if it had no more (an H100 80GB's 79.2 on an
    H200): torch's allocator refuses past the cap. Returns the cap as a fraction of the GPU, by which
    --gpu-memory-utilization is scaled so the KV pool is sized as on the smaller GPU."""
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = gib * 2**30 / total
    if not 0 < fraction <= 1:
        raise SystemExit(f"--memory-cap-gib {gib} must be above 0 and at most the GPU's {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(fraction)
    return fraction


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the engine on dummy weights, run every measurement, return the figures as a dict."""
    rng = random.Random(0)
    if args.cudnn_attention is not None:
        from qwenserve.kernels import cudnn_attention

        cudnn_attention.set_enabled(args.cudnn_attention)
    utilization = args.gpu_memory_utilization
    if args.memory_cap_gib is not None:
        utilization *= cap_memory(args.memory_cap_gib)
    config = EngineConfig(
        model=str(args.config), load_format="dummy", max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, gpu_memory_utilization=utilization,
        enforce_eager=args.enforce_eager, use_kernels=args.use_kernels,
    )
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    load_s = time.perf_counter() - t0
    cfg = engine.model_config
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    bw, peak = next((v for k, v in DEVICE_PEAKS.items() if k in name), (3.35e12, 989e12))
    weights_gb = sum(p.numel() * p.element_size() for p in engine.model.parameters()) / 1e9
    kv_tokens = engine.block_manager.num_usable_blocks * engine.config.block_size
    res: dict[str, Any] = {
        "device": name, "hbm_bytes_per_s": bw, "peak_bf16_flops": peak, "load_s": load_s,
        "weights_gb": weights_gb, "kv_pool_tokens": kv_tokens, "uses_kernels": engine.uses_kernels,
        "cuda_graphs": engine.runner.graphs is not None, "max_model_len": engine.max_model_len,
    }
    print(json.dumps(res), flush=True)

    run_requests(engine, [random_prompt(256, rng)], 8)  # warm up
    res["decode"] = []
    for context in args.decode_contexts:
        d = decode_speed(engine, context, args.decode_tokens, rng)
        limit = bw / decode_step_bytes(cfg, 1, context)
        d |= {"limit_tok_s": limit, "fraction_of_limit": d["tok_s"] / limit}
        res["decode"].append(d)
        print("decode", json.dumps(d), flush=True)
    res["decode_sampled"] = []
    sampling = model_sampling(args.config)
    for context in args.sampled_contexts:
        d = decode_speed(engine, context, args.decode_tokens, rng, sampling)
        limit = bw / decode_step_bytes(cfg, 1, context)
        d |= {"limit_tok_s": limit, "fraction_of_limit": d["tok_s"] / limit, "sampling": sampling}
        res["decode_sampled"].append(d)
        print("decode_sampled", json.dumps(d), flush=True)

    res["prefill"] = []
    for n in args.prefill_lengths:
        run_requests(engine, [random_prompt(n, rng)], 1)  # warm: same shapes, different tokens
        r = run_requests(engine, [random_prompt(n, rng)], 1)
        limit_s = prefill_flops(cfg, n) / peak
        p = {"tokens": n, "ttft_s": r["ttft_s"][0], "limit_s": limit_s, "fraction_of_limit": limit_s / r["ttft_s"][0]}
        res["prefill"].append(p)
        print("prefill", json.dumps(p), flush=True)

    if args.fixtures and (args.fixtures / "first-turn.json").exists():
        res["qwen_code"] = qwen_code_turns(engine, args.fixtures, cfg, peak)
        print("qwen_code", json.dumps(res["qwen_code"]), flush=True)

    res["throughput"] = []
    for streams in args.streams:
        prompts = [random_prompt(args.stream_prompt, rng) for _ in range(streams)]
        run_requests(engine, [random_prompt(args.stream_prompt, rng) for _ in range(streams)], 4)
        r = run_requests(engine, prompts, args.stream_output)
        tok_s = r["generated_tokens"] / r["wall_s"]
        limit_s = (args.stream_output * decode_step_bytes(cfg, streams, args.stream_prompt + args.stream_output // 2) / bw
                   + prefill_flops(cfg, args.stream_prompt) * streams / peak)
        limit = streams * args.stream_output / limit_s
        t = {"streams": streams, "prompt": args.stream_prompt, "output": args.stream_output, "tok_s": tok_s,
             "wall_s": r["wall_s"], "mean_ttft_s": sum(r["ttft_s"]) / streams, "limit_tok_s": limit,
             "fraction_of_limit": tok_s / limit}
        res["throughput"].append(t)
        print("throughput", json.dumps(t), flush=True)

    if torch.cuda.is_available():
        res["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["gpu_total_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        res["memory_cap_gib"] = args.memory_cap_gib
    if args.baseline:
        b = hf_baseline(engine, args.config, 512, args.baseline_tokens, args.baseline_repeats, rng)
        ours = next((d["tok_s"] for d in res["decode"] if d["context"] == 512), None)
        b["speedup_ours_vs_hf"] = ours / b["tok_s"] if ours else None
        res["baseline_hf_generate"] = b
        print("baseline", json.dumps(b), flush=True)
    return res


def qwen_code_turns(engine: LLMEngine, fixtures: Path, cfg: ModelConfig, peak: float) -> dict[str, Any]:
    """TTFT of qwen-code's first turn cold and of its follow-up with the first turn cached."""
    first = render_fixture(engine, fixtures / "first-turn.json")
    follow = render_fixture(engine, fixtures / "after-tool-call.json")
    # Warm the same shapes on a copy whose first token differs, so nothing of it is cached for the real run.
    run_requests(engine, [[first[0] + 1] + first[1:]], 1)
    run_requests(engine, [[follow[0] + 1] + follow[1:]], 1)
    cold = run_requests(engine, [first], 1)
    warm = run_requests(engine, [follow], 1)
    return {
        "first_turn_tokens": len(first), "first_turn_ttft_s": cold["ttft_s"][0],
        "first_turn_limit_s": prefill_flops(cfg, len(first)) / peak,
        "follow_up_tokens": len(follow), "follow_up_cached_tokens": warm["cached_tokens"],
        "follow_up_ttft_s": warm["ttft_s"][0],
        "follow_up_limit_s": prefill_flops(cfg, len(follow) - warm["cached_tokens"], warm["cached_tokens"]) / peak,
    }


def markdown(res: dict[str, Any], command: str, commit: str) -> str:
    """A BENCHMARKS.md section for one run."""
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    lines = [
        f"### {date} · {res['device']} · commit `{commit}`", "",
        f"Command: `{command}`  ",
        f"Dummy full-size Qwen3-Coder-30B-A3B weights ({res['weights_gb']:.1f} GB bf16), Triton kernels: "
        f"{res['uses_kernels']}, CUDA graphs: {res['cuda_graphs']}, KV pool: {res['kv_pool_tokens']:,} tokens, "
        f"peak GPU memory {res.get('peak_memory_gib', 0):.1f} GiB of {memory_of(res)}.", "",
        "| figure | ours | physical limit | fraction |", "|---|---:|---:|---:|",
    ]
    for d in res["decode"]:
        lines.append(f"| batch-1 decode, {d['context']:,} ctx | {d['tok_s']:.1f} tok/s | {d['limit_tok_s']:.0f} tok/s | {d['fraction_of_limit']:.0%} |")
    for d in res.get("decode_sampled", []):
        how = ", ".join(f"{k} {v}" for k, v in d["sampling"].items() if k != "seed")
        lines.append(f"| batch-1 decode, {d['context']:,} ctx, the model's default sampling ({how}) | {d['tok_s']:.1f} tok/s | {d['limit_tok_s']:.0f} tok/s | {d['fraction_of_limit']:.0%} |")
    for p in res["prefill"]:
        lines.append(f"| prefill TTFT, {p['tokens']:,} tokens (cold) | {p['ttft_s'] * 1000:.0f} ms | {p['limit_s'] * 1000:.0f} ms | {p['fraction_of_limit']:.0%} |")
    if q := res.get("qwen_code"):
        lines.append(f"| qwen-code first turn TTFT, {q['first_turn_tokens']:,} tokens (cold) | {q['first_turn_ttft_s'] * 1000:.0f} ms | {q['first_turn_limit_s'] * 1000:.0f} ms | {q['first_turn_limit_s'] / q['first_turn_ttft_s']:.0%} |")
        lines.append(f"| qwen-code follow-up TTFT, {q['follow_up_tokens']:,} tokens ({q['follow_up_cached_tokens']:,} cached) | {q['follow_up_ttft_s'] * 1000:.0f} ms | {q['follow_up_limit_s'] * 1000:.1f} ms | {q['follow_up_limit_s'] / q['follow_up_ttft_s']:.0%} |")
    for t in res["throughput"]:
        lines.append(f"| {t['streams']} streams ({t['prompt']} in, {t['output']} out), output tok/s | {t['tok_s']:.0f} | {t['limit_tok_s']:.0f} | {t['fraction_of_limit']:.0%} |")
    if b := res.get("baseline_hf_generate"):
        runs = ", ".join(f"{r:.1f}" for r in b.get("tok_s_runs", []))
        lines.append(f"| baseline: Transformers generate(), batch-1 decode, 512 ctx (median of runs: {runs}) | {b['tok_s']:.1f} tok/s | | ours ÷ baseline: {b['speedup_ours_vs_hf'] or 0:.1f}× |")
    return "\n".join(lines) + "\n"


def memory_of(res: dict[str, Any]) -> str:
    """The GPU memory the run could use, as the table names it."""
    total = f"{res.get('gpu_total_gib', 0):.1f}"
    if cap := res.get("memory_cap_gib"):
        return f"{cap:.1f} (capped: the GPU has {total})"
    return total


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The bench command's options."""
    p = argparse.ArgumentParser(prog="qwenserve bench", description=(__doc__ or "").split("\n\n")[0] or None)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="dir with the model's config.json")
    p.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES, help="dir with qwen-code request fixtures")
    p.add_argument("--max-model-len", type=int, default=40960)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="use only this much GPU memory, as a smaller GPU would have (79.2: an H100 80GB)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-kernels", dest="use_kernels", action="store_false", help="torch reference ops only")
    p.add_argument("--cudnn-attention", dest="cudnn_attention", action="store_true", default=None,
                   help="long prefill chunks through cuDNN (the default, unless QWENSERVE_CUDNN_PREFILL=0)")
    p.add_argument("--no-cudnn-attention", dest="cudnn_attention", action="store_false",
                   help="every prefill chunk on the Triton kernel (as QWENSERVE_CUDNN_PREFILL=0)")
    p.add_argument("--decode-contexts", type=int, nargs="*", default=[512, 32768])
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--sampled-contexts", type=int, nargs="*", default=[512],
                   help="batch-1 decode again with generation_config.json's sampling (what qwen-code gets)")
    p.add_argument("--prefill-lengths", type=int, nargs="*", default=[2048, 8192])
    p.add_argument("--streams", type=int, nargs="*", default=[8, 32, 64])
    p.add_argument("--stream-prompt", type=int, default=1024)
    p.add_argument("--stream-output", type=int, default=256)
    p.add_argument("--no-baseline", dest="baseline", action="store_false")
    p.add_argument("--baseline-tokens", type=int, default=64)
    p.add_argument("--baseline-repeats", type=int, default=5, help="baseline runs; the median is reported")
    p.add_argument("--out", type=Path, default=Path("bench.json"), help="where to write the JSON figures")
    p.add_argument("--markdown", type=Path, default=None, help="append a results table to this file")
    p.add_argument("--commit", default=None, help="commit to name in the table (default: git rev-parse)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `qwenserve bench`: run, print the table, write the JSON and markdown."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("qwenserve bench needs a CUDA GPU (the full-size model does not fit a CPU run)", file=sys.stderr)
        return 2
    for path, flag in ((args.config, "--config"), (args.fixtures, "--fixtures")):
        if not path.is_dir():
            print(f"{path} does not exist: pass {flag} DIR (the defaults are the fixtures of a source checkout, "
                  "tests/fixtures/)", file=sys.stderr)  # fmt: skip
            return 2
    commit = args.commit or _git_commit()
    res = run(args)
    res |= {"commit": commit, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": "qwenserve bench " + " ".join(argv if argv is not None else sys.argv[1:])}
    for d in res.get("decode", []):
        d.pop("token_times", None)
    args.out.write_text(json.dumps(res, indent=2))
    table = markdown(res, res["command"], commit)
    print(table)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write("\n" + table)
    return 0


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("QWENSERVE_COMMIT", "unknown")


if __name__ == "__main__":
    raise SystemExit(main())
