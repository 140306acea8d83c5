"""What `qwenserve serve` prints once the model is ready: the URL and the exact qwen-code
settings (environment variables and a ~/.qwen/settings.json snippet)."""

from __future__ import annotations

import json
import os
import shlex

# qwen-code's first request carries ~17-19k tokens (system prompt and tool schemas, 0.24.4) before the
# conversation grows: a context below this cannot hold it, or leaves it no room to answer.
QWEN_CODE_MIN_CONTEXT = 20_480


# Binds to every address of the machine: a local client dials loopback, others this machine's address.
WILDCARD_HOSTS = ("0.0.0.0", "", "*", "::")


def client_host(host: str) -> str:
    """The address a local client should dial: wildcard binds become loopback."""
    if host in WILDCARD_HOSTS:
        return "[::1]" if host == "::" else "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def listen_url(host: str, port: int) -> str:
    """The address the server is bound to, as a URL (an IPv6 address in brackets)."""
    return f"http://{f'[{host}]' if ':' in host else host or '0.0.0.0'}:{port}"


def base_url(host: str, port: int) -> str:
    """The OpenAI base URL a client on this machine reaches the server at."""
    return f"http://{client_host(host)}:{port}/v1"


def qwen_code_settings(url: str, model: str, context: int) -> dict:
    """A ~/.qwen/settings.json that selects this server (key read from OPENAI_API_KEY)."""
    return {
        "modelProviders": {
            "openai": [
                {
                    "id": model,
                    "name": f"{model} (qwenserve)",
                    "baseUrl": url,
                    "envKey": "OPENAI_API_KEY",
                    "generationConfig": {"contextWindowSize": context},
                }
            ]
        },
        "security": {"auth": {"selectedType": "openai"}},
        "model": {"name": model},
    }


def _key_line(api_key: str | None) -> str:
    """How to give qwen-code the key; never the key itself (it would land in logs)."""
    if not api_key:
        return "  export OPENAI_API_KEY=qwenserve   # any non-empty value: no --api-key was set"
    if os.environ.get("QWENSERVE_API_KEY") == api_key:
        return '  export OPENAI_API_KEY="$QWENSERVE_API_KEY"'
    return "  export OPENAI_API_KEY='<the --api-key you set>'"


def ready_banner(
    host: str, port: int, model: str, context: int, api_key: str | None, is_demo: bool, path: str
) -> str:
    """The multi-line message printed when the server is ready."""
    url = base_url(host, port)
    what = "the built-in demo model: a tiny test model, not a real coder" if is_demo else path
    settings = json.dumps(qwen_code_settings(url, model, context), indent=2)
    lines = [
        "",
        f"qwenserve is ready: serving {model!r} ({what}), context {context} tokens",
        f"  OpenAI-compatible API: {url}   (docs: {url[:-3]}/docs)",
        *([f"  (from other machines: this machine's address in place of {client_host(host)})"]
          if host in WILDCARD_HOSTS else []),
        "",
        "Use it from qwen-code:",
        f"  export OPENAI_BASE_URL={url}",
        _key_line(api_key),
        f"  export OPENAI_MODEL={shlex.quote(model)}",
        '  qwen            # or headless: qwen -p "List the files in this directory" --yolo',
        "",
        "or put this in ~/.qwen/settings.json (and export OPENAI_API_KEY):",
        settings,
        "",
    ]
    if context < QWEN_CODE_MIN_CONTEXT:
        lines += [
            f"WARNING: qwen-code's first request alone is ~18k tokens (its system prompt and tools): a {context}-token "
            "context cannot hold it or leaves it no room to answer.",
            f"  Serve a context of at least {QWEN_CODE_MIN_CONTEXT} (--max-model-len, and KV cache memory to hold it); "
            "more, for long sessions.",
            "",
        ]
    return "\n".join(lines)
