"""Engine TokenLogprob lists in the two OpenAI response shapes (chat and legacy completions)."""

from __future__ import annotations

import codecs
import functools
import math
from collections.abc import Callable
from typing import Any

from qwenserve.engine.outputs import RequestOutput, TokenLogprob

# JSON has no -Infinity; vLLM reports impossible tokens with this floor too.
_FLOOR = -9999.0


def _finite(value: float) -> float:
    return _FLOOR if math.isinf(value) or math.isnan(value) else max(float(value), _FLOOR)


TokenBytes = Callable[[int, str], list[int]]


def shown_logprobs(out: RequestOutput) -> list[TokenLogprob] | None:
    """An output's logprobs without the stop token's entry: an EOS or stop_token_ids token ends the
    text without appearing in it, and OpenAI's logprobs cover only the returned text's tokens."""
    lps = out.logprobs
    if lps and out.finish_reason == "stop" and isinstance(out.stop_reason, int) and lps[-1].token_id == out.stop_reason:
        return lps[:-1]
    return lps


def utf8_bytes(_: int, token: str) -> list[int]:
    """A token's bytes when only its text is known."""
    return list(token.encode("utf-8"))


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """Byte-level BPE's (GPT-2, Qwen) printable stand-in character -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = 256 + n
    return {chr(c): b for b, c in chars.items()}


def byte_level_token_bytes(tokenizer: Any) -> TokenBytes:
    """(token id, text) -> the token's raw bytes: a token holding part of a multi-byte character
    decodes to U+FFFD as text, but its pieces joined must give the character back."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if type(getattr(backend, "decoder", None)).__name__ != "ByteLevel":
        return utf8_bytes  # e.g. SentencePiece pieces: their text is their bytes
    decoder = _byte_level_decoder()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])

    @functools.lru_cache(maxsize=65536)
    def token_bytes(token_id: int, token: str) -> list[int]:
        piece = tokenizer.convert_ids_to_tokens(token_id) if token_id not in special else None
        if isinstance(piece, str) and piece and all(ch in decoder for ch in piece):
            return [decoder[ch] for ch in piece]
        return utf8_bytes(token_id, token)

    return token_bytes


def _entry(token_id: int, token: str, logprob: float, token_bytes: TokenBytes) -> dict[str, Any]:
    return {"token": token, "logprob": _finite(logprob), "bytes": token_bytes(token_id, token)}


def chat_logprobs(items: list[TokenLogprob], token_bytes: TokenBytes = utf8_bytes) -> dict[str, Any]:
    """`choices[].logprobs` for chat: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for lp in items:
        entry = _entry(lp.token_id, lp.token, lp.logprob, token_bytes)
        entry["top_logprobs"] = [_entry(tid, tok, val, token_bytes) for tid, tok, val in lp.top_logprobs]
        content.append(entry)
    return {"content": content}


class TextOffsets:
    """OpenAI's `text_offset` of consecutive tokens: the index, in the text their bytes decode to, of
    the character that holds each token's first byte. A character split over tokens counts once; bytes
    that never complete a character read as U+FFFD, as the text shows them, and count before the next
    token. Fed chunk by chunk, a stream gets the offsets the whole text gets."""

    def __init__(self, start: int = 0):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = start  # characters decoded so far; the pending bytes of a cut character excluded

    def take(self, token_bytes: list[list[int]]) -> list[int]:
        """The offsets of the next tokens, given their bytes."""
        offsets = []
        for data in map(bytes, token_bytes):
            pending, _ = self._decoder.getstate()
            # The last character of the pending bytes + this token's first byte is the one that holds it.
            head = len((pending + data[:1]).decode("utf-8", errors="replace")) - 1 if data else 0
            offsets.append(self._chars + head)
            self._chars += len(self._decoder.decode(data))
        return offsets


def completion_logprobs(
    items: list[TokenLogprob | None],
    tokens: list[str],
    offsets: TextOffsets | int = 0,
    token_ids: list[int] | None = None,
    token_bytes: TokenBytes | None = None,
) -> dict[str, Any]:
    """`choices[].logprobs` for /v1/completions: parallel token / logprob / top / offset lists.

    A None item (the first prompt token) has no logprob. `offsets` continues the text the tokens
    follow (a stream's TextOffsets, or the number of characters before them); with the tokens' ids
    and raw bytes their offsets count characters that span tokens once, else their texts are their bytes.
    """
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    if isinstance(offsets, int):
        offsets = TextOffsets(offsets)
    if token_ids is None or token_bytes is None:
        token_ids, token_bytes = [0] * len(tokens), utf8_bytes
    text_offset = offsets.take([token_bytes(i, tok) for i, tok in zip(token_ids, tokens, strict=True)])
    for lp in items:
        if lp is None:
            token_logprobs.append(None)
            top.append(None)
        else:
            token_logprobs.append(_finite(lp.logprob))
            # OpenAI: "the logprob of the sampled token is always returned", so up to logprobs + 1 entries.
            alternatives = {t: _finite(v) for _, t, v in lp.top_logprobs}
            alternatives.setdefault(lp.token, _finite(lp.logprob))
            top.append(alternatives)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": text_offset}
