"""Request fields to engine SamplingParams: request values win, then the model's
generation_config.json defaults, then SamplingParams' own defaults."""

from __future__ import annotations

from typing import Any

from qwenserve.api.errors import bad_request
from qwenserve.api.protocol import SamplingFields
from qwenserve.engine.sampling_params import GENERATION_CONFIG_FIELDS, SamplingParams


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def build_sampling_params(
    req: SamplingFields,
    defaults: dict[str, Any],
    *,
    max_tokens: int | None,
    logprobs: int | None,
    extra_stop_token_ids: list[int] | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """SamplingParams for one request; raises InvalidRequestError on out-of-range values.

    temperature 0 from the request is respected (it is not "unset"); `max_tokens` None
    means up to the context limit (the engine clamps anything larger to the room left).
    """
    if req.stream_options is not None and not req.stream:
        raise bad_request(
            "'stream_options' is only allowed when 'stream' is true.", param="stream_options"
        )
    if req.logit_bias:
        raise bad_request(
            "'logit_bias' is not supported by this server; remove it (an empty object is accepted).",
            param="logit_bias",
            code="unsupported_parameter",
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
    )
