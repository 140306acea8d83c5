"""How long one full garbage collection stops a loaded engine, before and after the server freezes what
it holds once the model is loaded (qwenserve/api/server.py, freeze_startup_objects).

    python3 bench/gc_pause.py [CONFIG_DIR] [--repeats 5]

CONFIG_DIR: a model config directory, served on dummy weights (the full-size shape on a GPU); none: the demo
model. A full collection holds the GIL: the event loop and the engine thread (which launches the next decode
step) both wait it out. Prints the tracked-object count and each collection's pause in ms."""

from __future__ import annotations

import argparse
import gc
import json
import random
import time

import torch

import qwenserve.api.server as server  # the HTTP layer's modules are loaded in a serving process too
from qwenserve.bench import decode_speed, random_prompt, run_requests
from qwenserve.config import EngineConfig
from qwenserve.engine.llm_engine import LLMEngine


def full_collection_pauses(repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` full collections in a row."""
    pauses = []
    for _ in range(repeats):
        start = time.perf_counter()
        gc.collect()
        pauses.append(round((time.perf_counter() - start) * 1000, 1))
    return pauses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="model config directory (dummy weights); default: the demo model")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.config:
        config = EngineConfig(model=args.config, load_format="dummy", max_model_len=40000)
    else:
        config = EngineConfig()
    engine = LLMEngine(config)
    rng = random.Random(0)
    run_requests(engine, [random_prompt(256, rng)], 8)  # warm up: graphs, kernels
    tok_s = decode_speed(engine, 512, 128, rng)["tok_s"]
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "decode_tok_s_512": round(tok_s, 1),
        "tracked_objects": len(gc.get_objects()),
        "pauses_ms": full_collection_pauses(args.repeats),
    }
    server.freeze_startup_objects()
    result["frozen_objects"] = gc.get_freeze_count()
    result["tracked_objects_after_freeze"] = len(gc.get_objects())
    result["pauses_after_freeze_ms"] = full_collection_pauses(args.repeats)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
