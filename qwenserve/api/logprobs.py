"""Engine TokenLogprob lists in the two OpenAI response shapes (chat and legacy completions)."""

from __future__ import annotations

import math
from typing import Any

from qwenserve.engine.outputs import TokenLogprob

# JSON has no -Infinity; vLLM reports impossible tokens with this floor too.
_FLOOR = -9999.0


def _finite(value: float) -> float:
    return _FLOOR if math.isinf(value) or math.isnan(value) else max(float(value), _FLOOR)


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    """`choices[].logprobs` for chat: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for lp in items:
        entry = _entry(lp.token, lp.logprob)
        entry["top_logprobs"] = [_entry(tok, val) for _, tok, val in lp.top_logprobs]
        content.append(entry)
    return {"content": content}


def completion_logprobs(
    items: list[TokenLogprob | None], tokens: list[str], text_offset_start: int = 0
) -> dict[str, Any]:
    """`choices[].logprobs` for /v1/completions: parallel token / logprob / top / offset lists.

    A None item (an echoed prompt token) has no logprob.
    """
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    offsets = []
    offset = text_offset_start
    for lp, tok in zip(items, tokens, strict=True):
        offsets.append(offset)
        offset += len(tok)
        if lp is None:
            token_logprobs.append(None)
            top.append(None)
        else:
            token_logprobs.append(_finite(lp.logprob))
            top.append({t: _finite(v) for _, t, v in lp.top_logprobs} or {lp.token: _finite(lp.logprob)})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
