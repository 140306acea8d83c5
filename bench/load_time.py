"""How long a real-format checkpoint takes to load, and the server to become ready, on a GPU.

Writes a Hugging Face-layout safetensors checkpoint of the Qwen3-Coder-30B-A3B shape (hub tensor names,
one tensor per expert, an index file, ~4 GB shards) with random normal weights, `--layers` deep (the full
48 layers need ~61 GB of disk; 24 give half the bytes and half the tensors), then measures:

- reading the shard files end to end (the page cache's or the disk's bandwidth: the floor for a load);
- `build_model` from the checkpoint in a fresh process, cold and from the page cache, with the streamed
  reader (qwenserve.model.safetensors_stream) and with safetensors' own, tensor by tensor;
- `qwenserve serve --model DIR` from launch to /health 200 (load + KV pool + kernels' warm-up + graphs),
  then one chat answer: a first start (cold page cache, no compiled kernels) and a restart.

    python bench/load_time.py CONFIG_DIR --layers 24 --dir /tmp/ckpt --out load.json

The page cache is dropped before the reads where the machine allows it (root, not in a container that
forbids it); the JSON says which (`cold`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import save_file

SHARD_BYTES = 4 << 30
READERS = {False: "per_tensor", True: "streamed"}


def hub_tensors(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor name and shape in a Qwen3-MoE checkpoint as the hub stores it, in file order."""
    hidden, heads, kv_heads = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    inter, experts, vocab = cfg["moe_intermediate_size"], cfg["num_experts"], cfg["vocab_size"]
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{layer}."
        names += [
            (pre + "input_layernorm.weight", (hidden,)),
            (pre + "post_attention_layernorm.weight", (hidden,)),
            (pre + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (pre + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (pre + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (pre + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (pre + "self_attn.q_norm.weight", (head_dim,)),
            (pre + "self_attn.k_norm.weight", (head_dim,)),
            (pre + "mlp.gate.weight", (experts, hidden)),
        ]
        for expert in range(experts):
            at = f"{pre}mlp.experts.{expert}."
            names += [(at + "gate_proj.weight", (inter, hidden)), (at + "up_proj.weight", (inter, hidden)),
                      (at + "down_proj.weight", (hidden, inter))]  # fmt: skip
    return names + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def shard_plan(tensors: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors grouped into shards of at most SHARD_BYTES (bf16)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_checkpoint(config_dir: Path, out: Path, layers: int, seed: int) -> dict[str, Any]:
    """The checkpoint directory: config.json (`layers` deep), generation_config.json, shards, index."""
    cfg = json.loads((config_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copy(config_dir / "generation_config.json", out / "generation_config.json")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    plan = shard_plan(hub_tensors(cfg))
    weight_map: dict[str, str] = {}
    started = time.perf_counter()
    for i, shard in enumerate(plan):
        file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            # Norm weights near 1 and matrices at a trained model's scale, so the answers stay finite.
            centre = 1.0 if name.endswith("norm.weight") else 0.0
            drawn = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32) * 0.02 + centre
            tensors[name] = drawn.to(torch.bfloat16).cpu()
            weight_map[name] = file
        save_file(tensors, str(out / file), metadata={"format": "pt"})
    total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return {"shards": len(plan), "tensors": len(weight_map), "bytes": total,
            "write_s": round(time.perf_counter() - started, 1)}  # fmt: skip


def drop_page_cache() -> bool:
    """Evict the files from the page cache (root only); False where the machine does not allow it."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def read_files(files: list[Path]) -> float:
    """Seconds to read every byte of `files` once (64 MiB reads)."""
    buf = bytearray(64 << 20)
    started = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - started


LOAD_SNIPPET = """
import sys, time, json, torch
from pathlib import Path
from qwenserve.model import loader
from qwenserve.model.loader import build_model, load_model_config
loader.STREAMED_LOAD = bool(int(sys.argv[2]))
torch.cuda.init(); torch.empty(1, device="cuda")
path = Path(sys.argv[1])
cfg = load_model_config(path)
started = time.perf_counter()
model = build_model(cfg, path, torch.device("cuda"), torch.bfloat16)
torch.cuda.synchronize()
print(json.dumps({"build_model_s": time.perf_counter() - started}))
"""


def time_build_model(ckpt: Path, streamed: bool) -> float:
    """build_model from the checkpoint in a fresh process (CUDA initialised before the clock starts), with
    the streamed reader or safetensors' own, tensor by tensor."""
    cmd = [sys.executable, "-c", LOAD_SNIPPET, str(ckpt), str(int(streamed))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["build_model_s"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_server_ready(ckpt: Path, log_path: Path) -> dict[str, Any]:
    """Launch `qwenserve serve --model ckpt`, wait for /health 200, then ask one chat question."""
    port = free_port()
    cmd = [sys.executable, "-m", "qwenserve", "serve", "--model", str(ckpt), "--port", str(port)]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        ready = None
        while ready is None and time.perf_counter() - started < 900 and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    ready = time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        if ready is None:
            raise RuntimeError(f"the server did not become ready (exit code {proc.poll()}); see {log_path}")
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 16, "temperature": 0}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
        answer.raise_for_status()
        loaded = [line for line in log_path.read_text().splitlines() if " loaded in " in line]
        return {"ready_s": round(ready, 1), "log_loaded_line": loaded[-1] if loaded else None,
                "answer_tokens": answer.json()["usage"]["completion_tokens"]}  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="directory with the model's config.json and generation_config.json")
    p.add_argument("--layers", type=int, default=24, help="decoder layers to write (48: the whole model, ~61 GB)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/qwenserve-ckpt"), help="where to write the checkpoint")
    p.add_argument("--repeats", type=int, default=2, help="cold and warm loads per reader")
    p.add_argument("--skip-serve", action="store_true", help="time the loads only, not the server's start")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    p.add_argument("--server-log", type=Path, default=Path("load_server.log"))
    args = p.parse_args()
    result: dict[str, Any] = {"layers": args.layers, "device": torch.cuda.get_device_name()}
    if not (args.dir / "model.safetensors.index.json").exists():
        result["checkpoint"] = write_checkpoint(args.config, args.dir, args.layers, seed=0)
    else:  # written by an earlier run
        index = json.loads((args.dir / "model.safetensors.index.json").read_text())
        result["checkpoint"] = {"bytes": index["metadata"]["total_size"], "tensors": len(index["weight_map"])}
    files = sorted(args.dir.glob("*.safetensors"))
    gb = result["checkpoint"]["bytes"] / 1e9
    result["cold"] = drop_page_cache()
    read_s = read_files(files)
    result["read"] = {"s": round(read_s, 1), "GB_per_s": round(gb / read_s, 2)}
    for streamed in (False, True) * args.repeats:  # each reader cold, alternating
        drop_page_cache()
        load_s = time_build_model(args.dir, streamed)
        result.setdefault(f"build_model_cold_{READERS[streamed]}_s", []).append(round(load_s, 1))
    for streamed in (False, True) * args.repeats:  # the files now in the page cache: each reader's own ceiling
        load_s = time_build_model(args.dir, streamed)
        result.setdefault(f"build_model_warm_{READERS[streamed]}_s", []).append(round(load_s, 1))
    if not args.skip_serve:
        drop_page_cache()
        result["serve_first_start"] = time_server_ready(args.dir, args.server_log)
        # A restart: the page cache and the Triton / CUDA caches hold what the first start read and built.
        result["serve_restart"] = time_server_ready(args.dir, args.server_log.with_suffix(".restart.log"))
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
