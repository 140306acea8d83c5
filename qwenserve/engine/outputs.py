"""What the engine hands back to its callers as a request progresses."""

from __future__ import annotations

from dataclasses import dataclass, field

# A guided sequence reached text after which its grammar allows no token at all (a schema part no text
# can match, such as an impossible pattern): no valid answer can follow, so it ends there, and the
# server answers it as an error.
FINISH_GRAMMAR_DEAD_END = "grammar_dead_end"
# A guided sequence whose grammar took too long to compute one step's allowed tokens (guided.GRAMMAR_STEP_SECONDS):
# it would stall every other request at every step from then on, so it ends, and the server answers an error.
FINISH_GRAMMAR_TOO_SLOW = "grammar_too_slow"


@dataclass
class TokenLogprob:
    """One generated token with its logprob and the top alternatives (token text -> logprob)."""

    token_id: int
    token: str
    logprob: float
    top_logprobs: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """An increment of one sequence's output (one choice of a request).

    `text` and `token_ids` hold only what is new since the previous output for this
    `index`. `finish_reason` is None until the last output: then "stop" (EOS, stop
    token or stop string), "length" (max_tokens or context full), "abort", or
    FINISH_GRAMMAR_DEAD_END (a guided sequence whose grammar allows no next token) or
    FINISH_GRAMMAR_TOO_SLOW.
    """

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_generated_tokens: int
    stop_reason: int | str | None = None
    # With SamplingParams.prompt_logprobs, on choice 0's first output only: one entry per prompt
    # token, None for the first (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
