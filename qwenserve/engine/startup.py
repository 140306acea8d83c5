"""Choices the engine makes once, at start: the device and dtype, the CPU's op threads, the tokenizer
(and its markup tokens), and whether a requested KV budget fits the device."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

import torch

from qwenserve.config import ModelConfig, env_number

logger = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    """--device: "auto" is the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: "auto" is bf16 on a GPU, float32 on a CPU (the reference path)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def pick_step_tokens(requested: int | None, device: torch.device) -> int:
    """--max-num-batched-tokens: by default 8192 on a GPU, 2048 on a CPU (see EngineConfig)."""
    if requested is not None:
        return requested
    return 8192 if device.type == "cuda" else 2048


def available_memory(device: torch.device) -> int | None:
    """Bytes a KV pool could still take on `device` (the GPU's free memory, the host's available
    memory), or None where that cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_kv_memory_fits(budget: int, per_block: int, device: torch.device) -> None:
    """Refuse a --kv-cache-memory that holds no KV block or that the device cannot give, before allocating."""
    gib = 2**30
    if budget < 2 * per_block:
        raise ValueError(
            f"--kv-cache-memory {budget} bytes holds fewer than 2 KV blocks of this model ({per_block} bytes each): "
            f"give at least {2 * per_block} bytes, e.g. {max(1, -(-64 * per_block // 2**20))}MiB for 64 blocks"
        )
    available = available_memory(device)
    if available is not None and budget > available:
        where = "free on the GPU after the weights" if device.type == "cuda" else "available on this machine"
        raise ValueError(
            f"--kv-cache-memory {budget / gib:.2f} GiB is more than the {available / gib:.2f} GiB {where}: "
            "lower it (or leave it out: the pool then takes what --gpu-memory-utilization allows)"
        )


# Read as the module loads, as the server's other QWENSERVE_* settings are: `qwenserve serve` then refuses a bad
# value at once, before binding the port, on any device (read at load time, it was refused only once a CPU
# model had begun loading, with another exit code, and never on a GPU).
CPU_THREADS = int(env_number("QWENSERVE_CPU_THREADS", 0))


def limit_cpu_threads(cfg: ModelConfig) -> None:
    """Small models run one op thread on CPU: their ops are too short to split, and OpenMP workers
    that wait on each other turn a microsecond kernel into tens of milliseconds whenever another
    process (the HTTP client, a test) shares the cores. QWENSERVE_CPU_THREADS overrides."""
    if CPU_THREADS:
        torch.set_num_threads(CPU_THREADS)
    elif cfg.hidden_size * cfg.num_hidden_layers <= 4096:
        torch.set_num_threads(1)


def control_tokens(tokenizer: Any) -> dict[int, str]:
    """The added tokens whose text is markup (<tool_call>, <|im_end|>, <|fim_middle|>, ...), id to text:
    stop strings never match a piece of them. Not every added token: a tokenizer may add plain words too."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = {i: str(getattr(tok, "content", tok)) for i, tok in added.items()}
    return {i: text for i, text in texts.items() if re.fullmatch(r"<.+>", text)}


def load_tokenizer(path: Path) -> Any:
    """The checkpoint's tokenizer, or the demo model's Qwen one for a config-only directory."""
    from transformers import AutoTokenizer

    from qwenserve.demo import DEMO_MODEL_DIR

    has_tokenizer = (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()
    if not has_tokenizer:
        # A config-only directory (dummy-weight benchmarks): borrow the demo model's Qwen tokenizer.
        logger.warning("%s has no tokenizer; using the built-in Qwen tokenizer and chat template", path)
        path = DEMO_MODEL_DIR
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tokenizer, "chat_template", None):
        # Without one no chat request could be rendered; Qwen3-Coder's is what these models are trained on.
        logger.warning(
            "%s has no chat template (no chat_template.jinja, none in tokenizer_config.json): using the "
            "built-in Qwen3-Coder one", path,
        )
        tokenizer.chat_template = (DEMO_MODEL_DIR / "chat_template.jinja").read_text(encoding="utf-8")
    # The context limit is the engine's (--max-model-len); the tokenizer's own would only log "indexing
    # errors" for a prompt the engine then refuses with a clear 400.
    tokenizer.model_max_length = sys.maxsize
    return tokenizer
