"""Per-request sampling parameters, validated once at submission."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwenserve.engine.guided import Guide

MAX_TOP_LOGPROBS = 20

# Fields that a model's generation_config.json supplies when a request leaves them out.
GENERATION_CONFIG_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


# Ends every "prompt too long" message: what sets the context, for whoever runs the server.
CONTEXT_HINT = "the server's --max-model-len, and the KV cache memory, set the context"


class InvalidRequestError(ValueError):
    """A request that can never run as given (the HTTP layer answers 400).

    `param` names the offending field the way the OpenAI API spells it.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


# OpenAI caps logit_bias at a few hundred entries; each biased step adds them on the host's word.
MAX_LOGIT_BIAS = 1024


@dataclass
class SamplingParams:
    """How to pick tokens for one sequence and when to stop.

    temperature 0 means greedy. top_k 0 or -1 disables top-k. seed None draws a
    random seed at submission; a given seed makes the sample independent of the batch.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token's logprob plus top-k
    prompt_logprobs: int | None = None  # the same for every prompt token (its prefill skips the prefix cache)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling (OpenAI's)
    guide: Guide | None = None  # structured output: what the text must match (engine.guided)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if self.top_k is None or self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first out-of-range field."""
        checks = [
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature", "must be a finite number >= 0"),
            (0 <= self.top_k < 2**31, "top_k", "must be -1 or 0 (off), or in [1, 2**31)"),  # an int32 on the device
            (self.seed is None or -(2**63) <= self.seed < 2**63, "seed", "must fit in a signed 64-bit integer"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
             "must be a finite number > 0"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (self.min_tokens >= 0, "min_tokens", "must be >= 0"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             f"must not exceed max_tokens ({self.max_tokens})"),
            (1 <= self.n <= 128, "n", "must be in [1, 128]"),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
                "top_logprobs",
                f"must be in [0, {MAX_TOP_LOGPROBS}]",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS,
                "prompt_logprobs",
                f"must be in [0, {MAX_TOP_LOGPROBS}]",
            ),
        ]
        self._validate_logit_bias()
        if self.guide is not None and self.min_tokens:
            # The grammar may allow nothing but the end of the text, which min_tokens would forbid.
            raise InvalidRequestError(
                f"'min_tokens' cannot be combined with structured output ('{self.guide.param}').", param="min_tokens"
            )
        for ok, name, why in checks:
            if not ok:
                value = self.logprobs if name == "top_logprobs" else getattr(self, name)
                raise InvalidRequestError(f"'{name}' {why}, got {value!r}.", param=name)

    def _validate_logit_bias(self) -> None:
        bias = self.logit_bias or {}
        if len(bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(
                f"'logit_bias' holds {len(bias)} token ids; at most {MAX_LOGIT_BIAS} are accepted.", param="logit_bias"
            )
        for token_id, value in bias.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
                raise InvalidRequestError(
                    f"'logit_bias' values must be numbers in [-100, 100], got {value!r} for token {token_id}.",
                    param="logit_bias",
                )

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0
