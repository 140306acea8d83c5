"""Incremental detokenization and stop-string matching with O(1) work per token.

Only a short window of ids is decoded each step: the text of ids[prefix:] minus the
text of ids[prefix:read], emitted once it no longer ends in a partial UTF-8
character. Special tokens are skipped by the tokenizer (Qwen's <tool_call> family is
not special, so it stays in the text for the tool parser).
"""

from __future__ import annotations

from typing import Any

_CONTEXT_TOKENS = 4  # prompt ids decoded before the output so the first word is spaced right


class IncrementalDetokenizer:
    """One sequence's output text, token by token: `add` returns only the new, complete characters."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # The Rust tokenizer decodes 3x faster than the Python wrapper, which only adds a
        # clean-up pass that Qwen's tokenizer turns off.
        backend = getattr(tokenizer, "_tokenizer", None)
        cleanup = getattr(tokenizer, "clean_up_tokenization_spaces", True)
        self._fast_decode = backend.decode if backend is not None and not cleanup else None
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        if context and self._decode(context).endswith("\ufffd"):
            # A token-id prompt cut inside a character: the output's first bytes would complete it and
            # vanish from the text, which then no longer decodes from the output's own ids.
            context = []
        self.ids: list[int] = context
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        if self._fast_decode is not None:
            return self._fast_decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one id and return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Text still held at the end (a dangling partial character comes out as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class StopStringMatcher:
    """Holds back just enough text to see a stop string that spans several tokens."""

    def __init__(self, stop: list[str], include_stop: bool = False):
        self.stop = stop
        self.include_stop = include_stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.pending = ""
        # How much of `pending` came while inactive: a stop string that ended there was already passed.
        self.inactive_chars = 0

    def add(self, text: str, active: bool = True) -> tuple[str, str | None]:
        """Feed new text; return (text safe to emit, the stop string if one matched). While not
        `active` (the output is still shorter than min_tokens) nothing matches, but the tail is held
        back as usual, so a stop string that ends after activation still can."""
        if not self.stop:
            return text, None
        self.pending += text
        if not active:
            self.inactive_chars = len(self.pending)
        # Any match ending in the new text starts inside pending: the held-back tail is hold chars long.
        best: tuple[int, str] | None = None
        for s in self.stop if active else ():
            idx = self.pending.find(s, max(self.inactive_chars - len(s) + 1, 0))
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is not None:
            idx, s = best
            out = self.pending[: idx + len(s)] if self.include_stop else self.pending[:idx]
            self.pending, self.inactive_chars = "", 0
            return out, s
        cut = max(len(self.pending) - self.hold, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        self.inactive_chars = max(self.inactive_chars - cut, 0)
        return out, None

    def add_control(self, text: str, active: bool = True, token_text: str | None = None) -> tuple[str, str | None]:
        """Feed a control token's text (Qwen's `<tool_call>`, ...): a stop string may end with it whole
        but never match a piece of it (stop "a" inside `<tool_call>` left the client '<tool_c'), so no
        match can continue past it and what was held back is released with it.

        `text` may start with ordinary text the token completed (a held-back partial character);
        `token_text`, the token's own text, tells the two apart."""
        if not self.stop or not text:  # a special token the detokenizer skips is invisible: no boundary
            return self.add(text, active)
        lead = ""
        if token_text and text.endswith(token_text) and len(text) > len(token_text):
            lead, matched = self.add(text[: -len(token_text)], active)
            if matched is not None:
                return lead, matched
            text = token_text
        # The stop string ending with the token that starts earliest, as `add` picks the earliest match.
        ending = [s for s in self.stop if s.endswith(text) and self.pending.endswith(s[: len(s) - len(text)])]
        if active and ending:
            s = max(ending, key=len)
            kept = self.pending[: len(self.pending) - (len(s) - len(text))]
            self.pending, self.inactive_chars = "", 0
            return lead + (kept + s if self.include_stop else kept), s
        out, self.pending, self.inactive_chars = lead + self.pending + text, "", 0
        return out, None

    def flush(self) -> str:
        """The text held back as a possible stop-string prefix, now that the answer ended."""
        out, self.pending, self.inactive_chars = self.pending, "", 0
        return out
