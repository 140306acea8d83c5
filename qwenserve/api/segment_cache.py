"""Tokenization that reuses what earlier prompts already paid for.

qwen-code resends its whole history every turn: a ~17k-token system prompt and every earlier message,
then a few new ones. Tokenizing all of it again took longer than the engine's cached prefill of the
turn. A Hugging Face tokenizer cuts the text at its added tokens before anything else runs, so the text
between two `<|im_start|>` markers (one message of the chat format) tokenizes the same alone as inside
the prompt. The ids of long segments are kept (least recently used dropped first), and a new prompt
costs only the messages not seen before.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from typing import Any

SPLIT_TOKEN = "<|im_start|>"
# Shorter segments are tokenized every time: they cost little and would only churn the cache.
MIN_CACHED_CHARS = 512
MAX_CACHED_TOKENS = 4_000_000  # 16 MB of int32 ids

# Used once at start to confirm the segment-wise ids equal the whole text's for this tokenizer:
# spaces, newlines and non-ASCII text on both sides of the markers.
_PROBE = (
    "<|im_start|>system\n You are a helpful assistant. Ünïcödé 中文 テスト  \n\n<|im_end|>\n"
    "<|im_start|>user\n  What is 2 + 2?\t<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
    "<function=run_shell_command>\n<parameter=command>\nls -la\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
    "<|im_start|> <|im_start|>\n<|im_start|>assistant\n"
)


def _split_is_exact(tokenizer: Any) -> bool:
    """Whether the tokenizer always cuts the text at SPLIT_TOKEN, so each piece tokenizes on its own:
    an added token matched verbatim (not normalized, no whitespace stripped around it) that no other
    added token can overlap from the left, and a probe text that tokenizes the same both ways."""
    added = {getattr(tok, "content", str(tok)): tok for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()}
    token = added.get(SPLIT_TOKEN)
    flags = ("lstrip", "rstrip", "single_word", "normalized")
    if token is None or any(getattr(token, flag, True) for flag in flags):
        return False
    for other in added:
        if other != SPLIT_TOKEN and (
            SPLIT_TOKEN in other or any(other.endswith(SPLIT_TOKEN[:k]) for k in range(1, len(SPLIT_TOKEN)))
        ):
            return False
    whole = list(tokenizer.encode(_PROBE, add_special_tokens=False))
    return whole == _encode_pieces(tokenizer, _PROBE, lambda piece: tokenizer.encode(piece, add_special_tokens=False))


def _encode_pieces(tokenizer: Any, text: str, encode_piece: Any) -> list[int]:
    split_id = tokenizer.convert_tokens_to_ids(SPLIT_TOKEN)
    ids: list[int] = []
    for i, piece in enumerate(text.split(SPLIT_TOKEN)):
        if i:
            ids.append(split_id)
        if piece:
            ids.extend(encode_piece(piece))
    return ids


class SegmentEncoder:
    """`encode(text)` without special tokens added, equal to the tokenizer's, reusing the ids of the long
    segments (one chat message each) it has seen. Falls back to plain encoding for a tokenizer whose
    cuts at SPLIT_TOKEN could change the ids. Thread-safe."""

    def __init__(self, tokenizer: Any, max_cached_tokens: int = MAX_CACHED_TOKENS):
        self.tokenizer = tokenizer
        self.enabled = _split_is_exact(tokenizer)
        self.max_cached_tokens = max_cached_tokens
        self._segments: OrderedDict[str, array] = OrderedDict()
        self._num_cached_tokens = 0
        self._lock = threading.Lock()
        self.hits = 0  # segments served from the cache (for tests and curiosity)

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, as `tokenizer.encode(text, add_special_tokens=False)` gives them."""
        if not self.enabled or SPLIT_TOKEN not in text:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return _encode_pieces(self.tokenizer, text, self._segment)

    def _segment(self, piece: str) -> list[int] | array:
        if len(piece) < MIN_CACHED_CHARS:
            return self.tokenizer.encode(piece, add_special_tokens=False)
        with self._lock:
            ids = self._segments.get(piece)
            if ids is not None:
                self._segments.move_to_end(piece)
                self.hits += 1
                return ids
        ids = array("i", self.tokenizer.encode(piece, add_special_tokens=False))
        self._remember(piece, ids)
        return ids

    def _remember(self, piece: str, ids: array) -> None:
        if len(ids) > self.max_cached_tokens:
            return
        with self._lock:
            if piece in self._segments:
                return
            self._segments[piece] = ids
            self._num_cached_tokens += len(ids)
            while self._num_cached_tokens > self.max_cached_tokens:
                _, dropped = self._segments.popitem(last=False)
                self._num_cached_tokens -= len(dropped)
