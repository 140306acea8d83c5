"""Host time to tokenize qwen-code's real turns: the tokenizer on the whole prompt against
api/segment_cache.SegmentEncoder, which reuses the messages an earlier prompt held. CPU only:

    python bench/prompt_tokenize.py [--repeats 5]

Prints one JSON line per fixture turn (milliseconds, medians) and checks the ids are equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import transformers

from qwenserve.api.chat import normalize_messages, normalize_tools, render_chat
from qwenserve.api.protocol import ChatCompletionRequest
from qwenserve.api.segment_cache import SegmentEncoder
from qwenserve.demo import DEMO_MODEL_DIR

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "qwen-code-0.24.4"


def render(tokenizer: transformers.PreTrainedTokenizerBase, name: str) -> str:
    req = ChatCompletionRequest.model_validate(json.loads((FIXTURES / f"{name}.json").read_text()))
    return render_chat(tokenizer, normalize_messages(req.messages), normalize_tools(req.tools))


def timed_ms(fn: Callable[[str], list[int]], text: str) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = fn(text)
    return (time.perf_counter() - start) * 1e3, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    turns = [render(tokenizer, name) for name in ("first-turn", "after-tool-call")]
    whole: list[list[float]] = [[], []]
    cached: list[list[float]] = [[], []]
    for _ in range(args.repeats):
        encoder = SegmentEncoder(tokenizer)  # a fresh cache: the first turn is cold, the follow-up reuses it
        for i, text in enumerate(turns):
            ms, ids = timed_ms(lambda t: list(tokenizer.encode(t, add_special_tokens=False)), text)
            whole[i].append(ms)
            ms, same = timed_ms(encoder.encode, text)
            cached[i].append(ms)
            assert same == ids, "segment-wise ids differ from the tokenizer's"
    for i, name in enumerate(("first turn (cold)", "follow-up (first turn cached)")):
        print(json.dumps({"turn": name, "chars": len(turns[i]), "whole_ms": round(statistics.median(whole[i]), 1),
                          "segment_cache_ms": round(statistics.median(cached[i]), 1)}))


if __name__ == "__main__":
    main()
