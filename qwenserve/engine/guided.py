"""Structured output: a grammar per sequence that allows only the tokens which keep the output
valid (OpenAI's response_format json_object / json_schema, vLLM's guided_* and structured_outputs).

xgrammar compiles a JSON schema, regex or EBNF grammar against the tokenizer's vocabulary once per
distinct spec; each sequence then walks it with a matcher that writes a bitmask of the allowed
tokens before every sample and accepts the sampled token after it. A mask needs the previous
token on the host, so a step holding a guided sequence is sampled only after the previous step's
tokens are processed (its forward already running; see LLMEngine.step).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from qwenserve.engine.sampling_params import InvalidRequestError

logger = logging.getLogger(__name__)

# calls_or_reply: either tool calls (a structural tag's format) or a JSON reply (json_object / json_schema),
# value {"calls": FORMAT, "reply": {"kind", "value"}}: tools beside OpenAI's response_format.
GuideKind = Literal["json_object", "json_schema", "regex", "choice", "grammar", "structural_tag", "calls_or_reply"]

# Compiled grammars kept for reuse: a client that builds a schema per request (an enum of ids) would
# otherwise grow the cache by megabytes per schema for as long as the server runs. vLLM's default.
GRAMMAR_CACHE_BYTES = 512 << 20

# JSON is written compactly (", " and ": " between items, no newlines): a model free to add whitespace
# can get stuck emitting it (Qwen models are known to) and run to max_tokens without a value.
JSON_OPTIONS = {"any_whitespace": False}

# CPU seconds one guided sequence's matcher may take to compute one step's allowed tokens. Masks are filled on
# the engine thread, so every other request waits for them; an ambiguous regex or grammar (`(.*){1,50}x`,
# `a ::= a a | "x"`: a few bytes each) costs more with every token, to minutes a step, and would stall the
# whole server. Such a sequence is ended (FINISH_GRAMMAR_TOO_SLOW). A JSON schema's mask takes milliseconds.
GRAMMAR_STEP_SECONDS = 0.5


@dataclass
class Guide:
    """What a request's output must match: `value` is the schema (JSON text), regex, EBNF grammar or
    a JSON list of choices; `param` is the request field it came from, for errors."""

    kind: GuideKind
    value: str = ""
    param: str = "response_format"
    compiled: Any = field(default=None, compare=False, repr=False)  # xgrammar.CompiledGrammar


class GuideCompiler:
    """Compiles guides against one tokenizer. xgrammar is imported and its view of the vocabulary built
    once (~1-3 s): by `warm` while a GPU server starts (LLMEngine then runs one guided request), else by the
    first guided request."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = list(stop_token_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    def _get_compiler(self, param: str) -> Any:
        with self._lock:
            if self._compiler is None:
                try:
                    import xgrammar
                except ImportError as err:  # a dependency of the project: only a broken install lacks it
                    raise InvalidRequestError(
                        f"'{param}' needs the xgrammar package, which this installation lacks "
                        "(pip install xgrammar, or rerun scripts/setup.sh)",
                        param=param,
                        code="unsupported_parameter",
                    ) from err

                info = xgrammar.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids
                )
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_limit_bytes=GRAMMAR_CACHE_BYTES)
            return self._compiler

    def compile(self, guide: Guide) -> Guide:
        """Fill `guide.compiled` (xgrammar caches identical specs); raise InvalidRequestError naming
        `guide.param` when the schema, regex or grammar cannot be compiled."""
        if guide.compiled is not None:
            return guide
        compiler = self._get_compiler(guide.param)
        try:
            compiled = _compile(compiler, guide)
        except (RuntimeError, ValueError, TypeError) as err:
            raise InvalidRequestError(
                f"'{guide.param}' cannot be used for structured output: {_clean_error(err)}", param=guide.param
            ) from err
        if not _allows_some_text(compiled, self._stop_token_ids):
            raise InvalidRequestError(
                f"'{guide.param}' matches no text (at most the empty one): no answer could satisfy it", param=guide.param
            )
        guide.compiled = compiled
        return guide

    def warm(self) -> bool:
        """Load xgrammar and its view of the vocabulary now: done while a GPU server starts, since ~2 s of
        Python work inside a running server would slow every stream's steps (they share the GIL). False
        when structured output is unavailable (said in the log)."""
        try:
            self._get_compiler("response_format")
        except InvalidRequestError as err:
            logger.warning("structured output is unavailable: %s", err.message)
            return False
        return True

    def matcher(self, guide: Guide) -> Any:
        """A fresh matcher (one per sequence) at the start of `guide`'s grammar."""
        import xgrammar

        return xgrammar.GrammarMatcher(self.compile(guide).compiled)


def _compile(compiler: Any, guide: Guide) -> Any:
    kind = guide.kind
    if kind == "json_object":
        # Any object (OpenAI's JSON mode answers with an object), properties unconstrained.
        return compiler.compile_json_schema('{"type": "object"}', strict_mode=False, **JSON_OPTIONS)
    if kind == "json_schema":
        return compiler.compile_json_schema(guide.value, **JSON_OPTIONS)
    if kind == "regex":
        return compiler.compile_regex(guide.value)
    if kind == "structural_tag":
        return compiler.compile_structural_tag(guide.value)
    if kind == "calls_or_reply":
        spec = json.loads(guide.value)
        # The reply as the same compact JSON the format alone gives (a structural tag's own JSON allows
        # any whitespace), beside the calls.
        reply = {"type": "grammar", "grammar": str(_json_grammar(spec["reply"]["kind"], spec["reply"]["value"]))}
        return compiler.compile_structural_tag(
            json.dumps({"type": "structural_tag", "format": {"type": "or", "elements": [reply, spec["calls"]]}})
        )
    if kind == "choice":
        choices = json.loads(guide.value)
        # EBNF string literals take JSON's escapes; ensure_ascii off, since JSON writes a character past
        # U+FFFF as two \u surrogates, which xgrammar would read as two code points.
        return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
    return compiler.compile_grammar(guide.value)


def _json_grammar(kind: str, schema: str) -> Any:
    """The grammar of a JSON reply, as compile_json_schema builds it for the format alone."""
    import xgrammar

    if kind == "json_object":
        return xgrammar.Grammar.from_json_schema('{"type": "object"}', strict_mode=False, **JSON_OPTIONS)
    return xgrammar.Grammar.from_json_schema(schema, **JSON_OPTIONS)


def _allows_some_text(compiled: Any, stop_token_ids: list[int]) -> bool:
    r"""Whether the grammar allows some first token besides ending at once (a regex such as [^\s\S]
    allows nothing; xgrammar reads a schema's empty anyOf as the empty text)."""
    import xgrammar

    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask = xgrammar.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask, 0)
    for token_id in stop_token_ids:
        bit = torch.tensor(1 << (token_id % 32), dtype=torch.int64).to(torch.int32)  # bit 31 wraps to int32
        bitmask[0, token_id // 32] &= ~bit
    return bool(bitmask.any())


def _clean_error(err: BaseException) -> str:
    """xgrammar's message without its timestamp, C++ source location and the failed check's condition."""
    text = str(err).strip()
    if "type mismatch!" in text:  # its JSON reader met a value of another type than the schema keyword takes
        return "a schema keyword holds a value of the wrong JSON type (such as a number in 'required')"
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)
    return re.sub(r"^Check failed: .*? is false: ", "", text) or type(err).__name__


def fill_bitmask(matchers: list[Any], vocab_size: int, pin: bool) -> tuple[torch.Tensor, list[int]]:
    """int32 [len(matchers), ceil(vocab / 32)] on the host (pinned when `pin`, so it can be copied to the
    device without waiting): bit t of row r set when matcher r allows token t; and the rows whose matcher
    took more than GRAMMAR_STEP_SECONDS of CPU time for it (their sequences are to be ended)."""
    bitmask = torch.full((len(matchers), -(-vocab_size // 32)), -1, dtype=torch.int32, pin_memory=pin)
    too_slow = []
    for row, matcher in enumerate(matchers):
        started = time.thread_time()  # CPU time: waiting for the GIL or a busy machine does not count
        matcher.fill_next_token_bitmask(bitmask, row)
        if time.thread_time() - started > GRAMMAR_STEP_SECONDS:
            too_slow.append(row)
        if not bitmask[row].any():
            # A dead end (text no continuation of the grammar allows): an all -inf row would sample NaN
            # probabilities, so it samples token 0, which the matcher then rejects, ending the sequence.
            bitmask[row, 0] = 1
    return bitmask, too_slow


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """`logits` with -inf at every token the bitmask of its row disallows (rows: the logits rows the
    bitmask's rows belong to, on the logits' device; bitmask there too)."""
    vocab = logits.shape[-1]
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]
    logits[rows] = logits[rows].masked_fill(~allowed, -torch.inf)
    return logits
