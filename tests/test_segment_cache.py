"""The tokenization cache of chat prompts (api/segment_cache.py) against the real Qwen tokenizer: its ids
must be exactly the tokenizer's own for the real qwen-code prompts and for random texts, a follow-up turn
must reuse the earlier turn's messages, and a tokenizer that would not cut cleanly at `<|im_start|>` must
not use it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import transformers
from tokenizers import AddedToken

from qwenserve.api.chat import normalize_messages, normalize_tools, render_chat
from qwenserve.api.protocol import ChatCompletionRequest
from qwenserve.api.segment_cache import SPLIT_TOKEN, SegmentEncoder
from qwenserve.demo import DEMO_MODEL_DIR

FIXTURES = Path(__file__).parent / "fixtures" / "qwen-code-0.24.4"


@pytest.fixture(scope="module")
def tokenizer() -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


def rendered(tokenizer: transformers.PreTrainedTokenizerBase, name: str) -> str:
    req = ChatCompletionRequest.model_validate(json.loads((FIXTURES / f"{name}.json").read_text()))
    return render_chat(tokenizer, normalize_messages(req.messages), normalize_tools(req.tools))


def plain(tokenizer: transformers.PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def test_qwen_code_turns_tokenize_exactly_and_the_follow_up_reuses_the_first(tokenizer) -> None:
    encoder = SegmentEncoder(tokenizer)
    assert encoder.enabled
    first, follow_up = rendered(tokenizer, "first-turn"), rendered(tokenizer, "after-tool-call")
    assert encoder.encode(first) == plain(tokenizer, first)
    assert encoder.hits == 0
    assert encoder.encode(follow_up) == plain(tokenizer, follow_up)
    assert encoder.hits >= 1  # the ~15k-token system message (prompt and tools) came from the cache
    assert encoder.encode(follow_up) == plain(tokenizer, follow_up)


def test_random_texts_around_the_markers_tokenize_exactly(tokenizer) -> None:
    rng = random.Random(7)
    pieces = [SPLIT_TOKEN, "<|im_end|>", "\n", " ", "  ", "\t", "system", "user\n", "assistant\n", "<tool_call>",
              "é", "中文", "😀", "x" * 600, "def f(x):\n    return x\n" * 40, "1234567", "'s", "\r\n"]  # fmt: skip
    encoder = SegmentEncoder(tokenizer)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        assert encoder.encode(text) == plain(tokenizer, text), repr(text)


def test_the_cache_stays_within_its_token_bound(tokenizer) -> None:
    encoder = SegmentEncoder(tokenizer, max_cached_tokens=3000)
    texts = [f"{SPLIT_TOKEN}user\n{i} " + "word " * 700 for i in range(6)]
    for text in texts:
        assert encoder.encode(text) == plain(tokenizer, text)
    assert 0 < encoder._num_cached_tokens <= 3000
    assert encoder.encode(texts[-1]) == plain(tokenizer, texts[-1]) and encoder.hits == 1
    assert encoder.encode(texts[0]) == plain(tokenizer, texts[0]) and encoder.hits == 1  # evicted long ago


def test_a_tokenizer_that_strips_around_the_marker_is_not_cut() -> None:
    """With lstrip on `<|im_start|>`, the spaces before it belong to the marker: cut there, the piece before
    would keep them and tokenize differently. Such a tokenizer encodes whole texts."""
    stripping = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    stripping.backend_tokenizer.add_special_tokens([AddedToken(SPLIT_TOKEN, lstrip=True, normalized=False, special=True)])
    text = f"a   {SPLIT_TOKEN}user\n" + "word " * 200
    split_id = stripping.convert_tokens_to_ids(SPLIT_TOKEN)
    assert plain(stripping, text)[:2] != plain(stripping, "a   ")[:2]  # the spaces went with the marker
    encoder = SegmentEncoder(stripping)
    assert not encoder.enabled
    assert encoder.encode(text) == plain(stripping, text) and split_id in plain(stripping, text)
