"""What the first structured-output request costs right after the engine starts (time to first token).

    python3 bench/first_guided.py CONFIG_DIR [--skip-guided-warmup]

Runs batches of 15-token prompts on dummy weights: 16 plain requests (half greedy, half the model's sampling),
one guided request (json_object) alone, then beside 8 or 16 plain ones. --skip-guided-warmup starts the engine
as before 2026-12-03 (xgrammar's vocabulary view only, no guided step). Measured on an H200 (twenty-eighth
session): the first guided request waited 2,775.7 ms for its first token without the warm-up step, 24.6 ms with
it; every later one ~25-50 ms either way (docs/BENCHMARKS.md)."""
import random
import sys
import time
from pathlib import Path

from qwenserve.bench import model_sampling
from qwenserve.config import EngineConfig
from qwenserve.engine.guided import Guide
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.engine.sampling_params import SamplingParams

if "--skip-guided-warmup" in sys.argv:  # the engine as before 2026-12-03: xgrammar's vocabulary view only
    LLMEngine._warm_structured_output = lambda self, guided: self.guides.warm()
engine = LLMEngine(EngineConfig(model=sys.argv[1], load_format="dummy", max_model_len=40000, max_num_seqs=32))
sampling = model_sampling(Path(sys.argv[1]))
rng = random.Random(0)
n = 0


def run(label, specs):
    global n
    start = time.perf_counter()
    first = {}
    for greedy, guided in specs:
        n += 1
        kw = {"temperature": 0.0} if greedy else dict(sampling)
        params = SamplingParams(**kw, max_tokens=16, ignore_eos=not guided,
                                guide=Guide("json_object") if guided else None)
        engine.add_request(f"r{n}", [rng.randrange(1000, 100000) for _ in range(15)], params)
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_ids:
                first.setdefault(out.request_id, time.perf_counter() - start)
    print(f"{label:55s} max ttft {max(first.values()) * 1000:8.1f} ms  wall {(time.perf_counter() - start) * 1000:8.1f} ms",
          flush=True)


mixed = [(i % 2 == 0, False) for i in range(16)]
run("16 mixed greedy/sampled", mixed)
run("16 mixed greedy/sampled again", mixed)
run("1 guided (sampled) alone", [(False, True)])
run("1 guided alone again", [(False, True)])
run("16 mixed + 1 guided", mixed + [(False, True)])
run("16 mixed + 1 guided again", mixed + [(False, True)])
run("8 mixed + 1 guided", mixed[:8] + [(False, True)])
run("8 mixed + 1 guided, greedy guide", mixed[:8] + [(True, True)])
run("32 mixed + 0 guided", mixed * 2)
