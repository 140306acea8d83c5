"""`qwenserve` command line: `serve` runs the OpenAI-compatible server; `bench` runs
`qwenserve.bench:main` (imported only then: it needs Transformers)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from qwenserve import __version__
from qwenserve.config import EngineConfig, parse_size

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _size(text: str) -> int:
    """Memory sizes such as 20GiB, 512MiB or a byte count (parse_size), more than zero."""
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is less than one byte: give a size such as 20GiB")
    return size


def _length(text: str) -> int:
    """Token counts such as 32768, 32k, 128K or 1m (k = 1024, m = 1024 * 1024)."""
    t = text.strip().lower()
    scale = {"k": 1 << 10, "m": 1 << 20}.get(t[-1:], 1)
    try:
        return int(float(t[:-1]) * scale) if scale > 1 else int(t)
    except (ValueError, OverflowError) as exc:  # OverflowError: "infk"
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (use e.g. 32768, 32k or 1m)") from exc


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc
    if not 0 <= seed < 1 << 63:
        raise argparse.ArgumentTypeError(f"a seed is in 0..2**63-1, got {seed}")
    return seed


def _origins(text: str) -> list[str]:
    """Origins as vLLM takes them (a JSON list: '["*"]') or comma-separated."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON list of origins: {text!r} ({exc.msg})") from exc
        if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
            raise argparse.ArgumentTypeError(f"not a JSON list of origin strings: {text!r}")
        origins = value
    else:
        origins = stripped.split(",")
    origins = [o.strip().rstrip("/") for o in origins if o.strip()]
    bad = [o for o in origins if o != "*" and "://" not in o]
    if bad:
        raise argparse.ArgumentTypeError(f"an origin is a scheme and host, such as https://app.example: got {bad[0]!r}")
    return origins


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from exc
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535 (0 picks a free one), got {port}")
    return port


def _default(name: str) -> object:
    """EngineConfig's own default, so the CLI and the library never disagree."""

    return EngineConfig.__dataclass_fields__[name].default


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """`serve` flags, spelled as vLLM spells them where vLLM has the same flag."""
    p.add_argument("model_tag", nargs="?", metavar="MODEL", help="same as --model")
    p.add_argument(
        "--model", help="local Hugging Face checkpoint directory or hub id; none: the built-in demo model"
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        metavar="NAME",
        help="name(s) listed by /v1/models; none: the model's name (requests may use any name)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback: local clients only)")
    p.add_argument("--port", type=_port, default=8000, help="port (0 picks a free one)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (or 'x-api-key: KEY') on every route but /health "
        "(env QWENSERVE_API_KEY)",
    )
    p.add_argument(
        "--allowed-origins",
        type=_origins,
        metavar="ORIGINS",
        help="web pages (origins) whose scripts may call the API (CORS): a JSON list as in vLLM ('[\"*\"]' for "
        "any) or comma-separated; default: pages served from this machine (localhost, 127.0.0.1, [::1])",
    )
    p.add_argument(
        "--max-model-len", type=_length, help="context length in tokens (32768, 32k, 1m); none: the model's"
    )
    mem = p.add_mutually_exclusive_group()
    mem.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=_default("gpu_memory_utilization"),
        help="fraction of GPU memory for weights + KV cache (a CPU's KV cache is 512MiB unless --kv-cache-memory)",
    )
    mem.add_argument(
        "--kv-cache-memory",
        "--kv-cache-memory-bytes",
        type=_size,
        metavar="SIZE",
        help="KV cache size, e.g. 20GiB (overrides --gpu-memory-utilization)",
    )
    p.add_argument(
        "--max-num-seqs", type=int, default=_default("max_num_seqs"), help="most sequences in a batch"
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=_default("max_num_batched_tokens"),
        help="token budget per engine step; long prompts are prefilled in chunks of it (none: 8192 on a "
        "GPU, 2048 on a CPU)",
    )
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=_default("max_queued_requests"),
        help="requests waiting beyond the running batch before new ones get 503",
    )
    p.add_argument(
        "--block-size", type=int, default=_default("block_size"), help="KV cache block size in tokens"
    )
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
        help="weights and activations; auto: bfloat16 on a GPU, float32 on CPU",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "dummy"],
        help="dummy: random weights of the model's shape (benchmarks without a checkpoint)",
    )
    p.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
        help="reuse the KV cache of prompt prefixes seen before (qwen-code resends its whole history)",
    )  # fmt: skip
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="overlap the host's work for the next step with the GPU's current step",
    )
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="GPUs to use, one process each: attention/dense layers tensor parallel, MoE experts split "
        "(without a GPU: CPU processes, for tests)",
    )
    p.add_argument("--seed", type=_seed, default=_default("seed"), help="torch seed (the random weights of --load-format dummy)")
    p.add_argument(
        "--log-requests", "--enable-log-requests", action="store_true", help="also log every request body"
    )
    p.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="server log verbosity"
    )


# vLLM's tool-call parsers for Qwen models; the chat template says which format the model writes.
VLLM_TOOL_PARSERS = ("qwen3_coder", "qwen3_xml", "hermes")


# The flags add_vllm_compat_args accepts (each logged at start when given).
VLLM_NOOP_FLAGS = (
    "--enable-auto-tool-choice", "--tool-call-parser", "--trust-remote-code", "--disable-log-requests",
    "--enable-chunked-prefill", "--enable-expert-parallel", "--kv-cache-dtype",
)  # fmt: skip


def add_vllm_compat_args(p: argparse.ArgumentParser) -> None:
    """Flags a vLLM command line for these models carries, accepted so it runs unchanged: what they
    turn on is always on here."""
    g = p.add_argument_group("accepted from vLLM command lines (always on here: nothing to set)")
    g.add_argument("--enable-auto-tool-choice", action="store_true", help="tool calls are always parsed")
    g.add_argument(
        "--tool-call-parser",
        choices=VLLM_TOOL_PARSERS,
        help="the format comes from the chat template (Qwen3-Coder XML or Qwen3 JSON calls)",
    )
    g.add_argument("--trust-remote-code", action="store_true", help="Qwen3 models need no remote code")
    g.add_argument(
        "--disable-log-requests", action="store_true", help="request bodies are logged only with --log-requests"
    )
    g.add_argument("--enable-chunked-prefill", action="store_true", help="long prompts are always prefilled in chunks")
    g.add_argument(
        "--enable-expert-parallel", action="store_true", help="with -tp the MoE experts are always split across GPUs"
    )
    g.add_argument("--kv-cache-dtype", choices=["auto"], help="the KV cache takes the model's dtype")


def _note_vllm_flags(args: argparse.Namespace, log: logging.Logger) -> None:
    given = [flag for flag in VLLM_NOOP_FLAGS if getattr(args, flag[2:].replace("-", "_"))]
    if given:
        log.info(
            "%s: accepted as in vLLM, nothing to set (tool calls are always parsed, in the format the chat "
            "template writes; chunked prefill is always on; -tp always splits the experts)",
            ", ".join(given),
        )


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="qwenserve", description="OpenAI-compatible server for Qwen3-Coder models."
    )
    parser.add_argument("--version", action="version", version=f"qwenserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,bench}")
    serve = sub.add_parser(
        "serve",
        help="serve a model over the OpenAI API",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_serve_args(serve)
    add_vllm_compat_args(serve)
    serve.set_defaults(subparser=serve)
    sub.add_parser(
        "bench", help="benchmark the engine on a GPU against Transformers (qwenserve bench --help)", add_help=False
    )
    return parser


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from the parsed `serve` flags; raises ValueError on bad combinations."""

    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        load_format=args.load_format,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_queued_requests=args.max_queued_requests,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=args.enable_prefix_caching,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        tensor_parallel_size=args.tensor_parallel_size,
        seed=args.seed,
    )


def serve(args: argparse.Namespace) -> int:
    """Run `qwenserve serve`; returns the exit code."""
    _configure_logging(args.log_level)
    log = logging.getLogger("qwenserve")
    if (problem := _model_argument_problem(args)) is not None:
        log.error("%s", problem)
        return 2
    args.model = args.model or args.model_tag
    _note_vllm_flags(args, log)
    env_key = os.environ.get("QWENSERVE_API_KEY")
    if (problem := _api_key_problem(args.api_key, env_key)) is not None:
        log.error("%s", problem)
        return 2
    try:
        config = engine_config(args)
    except ValueError as exc:
        log.error("invalid option: %s", exc)
        return 2
    if args.model is None:
        from qwenserve.demo import DEMO_MODEL_NAME

        log.info(
            "no --model given: serving the built-in demo model %r (a tiny model for trying things out "
            "and tests; pass --model PATH_OR_HUB_ID for a real checkpoint)",
            DEMO_MODEL_NAME,
        )
    if args.model is not None and (problem := _local_model_problem(args.model)):
        log.error("failed to load the model: %s", problem)  # before the port is bound and the loading starts
        return 1
    try:  # the server's modules read their QWENSERVE_* environment settings as they load
        from qwenserve.api.launch import run_server
        from qwenserve.api.state import ServerSettings
        from qwenserve.engine.async_engine import AsyncEngine
    except ValueError as exc:
        log.error("invalid setting: %s", exc)
        return 2

    settings = ServerSettings(
        host=args.host,
        port=args.port,
        served_model_names=list(args.served_model_name or []),
        # From the environment rather than an argparse default, so --help never shows it.
        api_key=args.api_key or env_key or None,
        log_requests=args.log_requests,
        allowed_origins=args.allowed_origins,
    )
    if settings.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s without an API key: anyone who can reach this machine can use the model "
            "(set --api-key or QWENSERVE_API_KEY)",
            args.host,
        )
    return run_server(AsyncEngine(config), settings, log_level=args.log_level)


def _configure_logging(level: str) -> None:
    """The server's log lines on stderr; libraries' own INFO lines (each hub request, torch's compile-cache
    stats at exit) are not the server's, so they show only at debug."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    if level != "debug":
        for name in ("httpx", "httpcore", "urllib3", "filelock", "huggingface_hub", "torch"):
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))


def _model_argument_problem(args: argparse.Namespace) -> str | None:
    """Why the model arguments cannot be meant as given (None when they can)."""
    if args.model_tag and args.model and args.model_tag != args.model:
        return f"give the model once: positional {args.model_tag!r} and --model {args.model!r} differ"
    if not (args.model or args.model_tag) and (swallowed := _model_among_names(args.served_model_name or [])):
        return (
            f"no model given, but --served-model-name took {swallowed!r} as a name (it takes every word after "
            "it): put the model first ('qwenserve serve MODEL --served-model-name NAME') or pass --model"
        )
    return None


def _api_key_problem(flag_key: str | None, env_key: str | None) -> str | None:
    """An empty key: `--api-key "$KEY"` (or QWENSERVE_API_KEY=$KEY) with KEY unset would otherwise serve
    with no key at all."""
    if flag_key is not None and not flag_key.strip():
        return "--api-key is empty (is the variable you passed unset?): give a key, or leave the flag out"
    if flag_key is None and env_key is not None and not env_key.strip():
        return "QWENSERVE_API_KEY is set but empty: give it a key, or unset it to serve without one"
    return None


def _local_model_problem(model: str) -> str | None:
    """What is wrong with a model given as a local path (no config.json, an unsupported architecture or
    quantization, ...), found in a moment; None when it looks servable, or is a hub id (resolved as it loads)."""
    from qwenserve.model.loader import ModelNotFoundError, is_hub_id, load_model_config, resolve_model_path

    if is_hub_id(model):
        return None
    try:
        load_model_config(resolve_model_path(model))
    except (ModelNotFoundError, ValueError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _model_among_names(names: list[str]) -> str | None:
    """A served name after the first that is a directory or reads as a hub id: the model, meant as MODEL."""
    from qwenserve.model.loader import is_hub_id

    return next((n for n in names[1:] if os.path.isdir(n) or is_hub_id(n)), None)


def run_bench(argv: list[str]) -> int:
    """Hand `qwenserve bench ...` to qwenserve.bench:main (imported only then: it needs Transformers)."""
    result = importlib.import_module("qwenserve.bench").main(argv)
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `qwenserve` script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "bench":
            return run_bench(argv[1:])
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:  # refused by the subcommand, whose usage lists its flags (the top level's lists none)
            args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if args.command == "serve":
            return serve(args)
    except KeyboardInterrupt:  # Ctrl-C before the server took over the signal: no traceback
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
