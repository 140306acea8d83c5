"""Request fields to engine SamplingParams: request values win, then the model's
generation_config.json defaults, then SamplingParams' own defaults."""

from __future__ import annotations

import re
from typing import Any

from qwenserve.api.errors import bad_request
from qwenserve.api.protocol import ChatCompletionRequest, SamplingFields
from qwenserve.engine.guided import Guide
from qwenserve.engine.sampling_params import GENERATION_CONFIG_FIELDS, SamplingParams


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


# vLLM request extensions declared in api.protocol but not implemented here -> what to do instead.
_UNIMPLEMENTED = {
    "prompt_logprobs": "score a prompt with /v1/completions, 'echo' and 'logprobs'",
    "guided_whitespace_pattern": "JSON is written compactly, without a choice of whitespace",
}
_CHAT_UNIMPLEMENTED = {
    "chat_template": "prompts are rendered with the model's own chat template",
    "echo": "on chat completions; /v1/completions has 'echo'",
}


def refuse_unimplemented(req: SamplingFields) -> None:
    """400 unsupported_parameter for a vLLM extension this server would otherwise ignore."""
    chat = isinstance(req, ChatCompletionRequest)
    for name, instead in (_UNIMPLEMENTED | _CHAT_UNIMPLEMENTED if chat else _UNIMPLEMENTED).items():
        value = getattr(req, name, None)
        if value is not None and value is not False:
            raise bad_request(
                f"'{name}' is not supported by this server ({instead}); remove it.",
                param=name,
                code="unsupported_parameter",
            )
    if req.stream_options is not None and req.stream_options.continuous_usage_stats:
        raise bad_request(
            "'stream_options.continuous_usage_stats' is not supported by this server; the usage chunk "
            "('include_usage') comes at the end of the stream.",
            param="stream_options.continuous_usage_stats",
            code="unsupported_parameter",
        )


def build_sampling_params(
    req: SamplingFields,
    defaults: dict[str, Any],
    *,
    max_tokens: int | None,
    logprobs: int | None,
    extra_stop_token_ids: list[int] | None = None,
    prompt_logprobs: int | None = None,
    guide: Guide | None = None,
) -> SamplingParams:
    """SamplingParams for one request; raises InvalidRequestError on out-of-range values.

    temperature 0 from the request is respected (it is not "unset"); `max_tokens` None
    means up to the context limit (the engine clamps anything larger to the room left).
    """
    refuse_unimplemented(req)
    if req.stream_options is not None and not req.stream:
        raise bad_request(
            "'stream_options' is only allowed when 'stream' is true.", param="stream_options"
        )
    values: dict[str, Any] = {}
    for name in GENERATION_CONFIG_FIELDS:
        value = getattr(req, name)
        if value is None:
            value = defaults.get(name)
        if value is not None:
            values[name] = value
    if req.temperature is None and defaults.get("do_sample") is False:
        values["temperature"] = 0.0  # generation_config.json asks for greedy decoding
    if values.get("top_k") is not None:
        values["top_k"] = int(values["top_k"])
    stop_ids = list(req.stop_token_ids or []) + list(extra_stop_token_ids or [])
    return SamplingParams(
        **values,
        seed=req.seed,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=_stop_list(req.stop),
        include_stop_str_in_output=req.include_stop_str_in_output,
        stop_token_ids=stop_ids,
        ignore_eos=req.ignore_eos,
        n=req.n,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        logit_bias=_logit_bias(req.logit_bias),
        guide=guide,
    )


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias: token ids (JSON keys, so strings) -> a bias in [-100, 100] added to the logit."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        # Canonical decimal only: '01' next to '1' would otherwise name one token twice, one value lost.
        if not re.fullmatch(r"-?(0|[1-9][0-9]*)", key):
            raise bad_request(
                f"'logit_bias' keys must be token ids, got {key!r} (find ids with POST /tokenize).", param="logit_bias"
            )
        out[int(key)] = value
    return out
