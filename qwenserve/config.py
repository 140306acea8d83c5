"""Configuration dataclasses: the model's shape (read from config.json) and the engine's knobs."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("Qwen3MoeForCausalLM", "Qwen3ForCausalLM")
MAX_BLOCK_SIZE = 256  # tokens per KV cache block (vLLM's largest CUDA choice is 128)


@dataclass
class RopeConfig:
    """Rotary embedding parameters; `rope_type` is "default" or "yarn"."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass
class ModelConfig:
    """The hyper-parameters our model code needs, from a Hugging Face config.json.

    Reads both the hub key names (num_experts, rope_theta, rope_scaling) and the
    names Transformers 5 writes on save (rope_parameters, num_local_experts).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig
    initializer_range: float = 0.02
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # Transformers' default (Qwen3MoeConfig) when config.json leaves it out
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)
    # An FP8 checkpoint (quantization_config.quant_method "fp8"): its weights are dequantized on load, with
    # one scale per [rows, cols] block of fp8_weight_block, else per tensor or per output row.
    fp8: bool = False
    fp8_weight_block: tuple[int, int] | None = None

    @property
    def is_moe(self) -> bool:
        return self.architecture == "Qwen3MoeForCausalLM" and self.num_experts > 0

    def layer_is_moe(self, layer: int) -> bool:
        """Whether decoder layer `layer` uses the sparse MoE block (Qwen3-MoE's rule)."""
        return (
            self.is_moe
            and layer not in self.mlp_only_layers
            and (layer + 1) % max(self.decoder_sparse_step, 1) == 0
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Validate a config.json's contents (hub or Transformers 5 key names) into a ModelConfig."""
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(
            raw.get("model_type", ""), ""
        )
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r}: qwenserve runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for key in _REQUIRED_SIZES:
            value = raw.get(key)
            if key not in raw:
                raise ValueError(f"config.json has no {key!r}: is it a whole Qwen3 model config?")
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config.json: {key!r} must be a positive integer, got {value!r}")
        _check_unsupported_features(raw)
        heads = raw["num_attention_heads"]
        eos = raw.get("eos_token_id")
        fp8 = _is_fp8(raw)
        # A key config.json leaves out takes Transformers' default for the architecture, as
        # AutoModelForCausalLM reads it; a null one falls back as Transformers' model code does.
        if raw.get("num_experts") is None and "num_local_experts" in raw:
            raw = {**raw, "num_experts": raw["num_local_experts"]}  # the name Transformers 5 writes
        raw = {**_TRANSFORMERS_DEFAULTS[arch], **raw}
        cfg = cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            intermediate_size=raw.get("intermediate_size") or 0,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope=_rope_from_dict(raw),
            initializer_range=raw.get("initializer_range", 0.02),
            num_experts=raw.get("num_experts") or 0,
            num_experts_per_tok=raw.get("num_experts_per_tok") or 0,
            moe_intermediate_size=raw.get("moe_intermediate_size") or 0,
            # Absent means False, as Transformers reads it (Qwen3MoeConfig's default); Qwen's own configs set it.
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            decoder_sparse_step=raw.get("decoder_sparse_step", 1) or 1,
            mlp_only_layers=list(raw.get("mlp_only_layers") or []),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
            fp8=fp8,
            fp8_weight_block=_fp8_block(raw) if fp8 else None,
        )
        if cfg.is_moe and not 1 <= cfg.num_experts_per_tok <= cfg.num_experts:
            # Routing to no expert (or to more than there are) fails every request, not the start.
            raise ValueError(
                f"config.json: num_experts_per_tok must be from 1 to num_experts ({cfg.num_experts}), "
                f"got {raw.get('num_experts_per_tok')!r}"
            )
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read and validate a config.json."""
        with open(path, encoding="utf-8") as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON ({exc}): is the checkpoint download complete?") from exc
        return cls.from_dict(raw)


# What config.json must give: the sizes nothing else implies.
_REQUIRED_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")

# Transformers' defaults (Qwen3Config, Qwen3MoeConfig; the same in 4.51 and 5) for the keys a config.json may
# leave out that change the model: read as 0 or hidden_size // heads instead, a MoE config without
# num_experts_per_tok routed every token to no expert (each request a 500), and a dense one without head_dim
# (Transformers: 128) was refused at load, the checkpoint's q/k norms being 128 wide.
_TRANSFORMERS_DEFAULTS: dict[str, dict[str, Any]] = {
    "Qwen3ForCausalLM": {"head_dim": 128, "num_key_value_heads": 32, "intermediate_size": 22016},
    "Qwen3MoeForCausalLM": {
        "num_key_value_heads": 4,
        "intermediate_size": 6144,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
    },
}


def _check_unsupported_features(raw: dict[str, Any]) -> None:
    """Refuse what Transformers' Qwen3 / Qwen3-MoE would compute and our model would silently skip:
    biases on the attention projections (the loader has no place for them) and sliding-window attention."""
    if raw.get("attention_bias"):
        raise ValueError(
            "config.json sets attention_bias: true, which qwenserve's Qwen3 model does not implement (its q/k/v/o "
            "projections have no bias; Qwen's own checkpoints set it false): this checkpoint cannot be served exactly"
        )
    if raw.get("use_sliding_window") and raw.get("sliding_window"):
        raise ValueError(
            f"config.json sets use_sliding_window: true (sliding_window {raw['sliding_window']}), which qwenserve "
            "does not implement: every token would attend to the whole context. Set use_sliding_window to false "
            "if the model was trained with full attention"
        )


def _is_fp8(raw: dict[str, Any]) -> bool:
    """Whether config.json describes an FP8 checkpoint; any other quantization is refused here."""
    quant = raw.get("quantization_config")
    if not quant:
        return False
    if not isinstance(quant, dict):
        raise ValueError(f"config.json: quantization_config must be an object, got {quant!r}")
    method = quant.get("quant_method")
    if method != "fp8":
        # bitsandbytes' configs written by older Transformers name no method, only bnb_* fields.
        named = repr(method) if method else "bitsandbytes" if any("bnb" in key for key in quant) else "an unnamed method"
        raise ValueError(
            f"this checkpoint is quantized with {named}, which qwenserve cannot load: it serves bf16 / fp16 "
            "checkpoints and FP8 ones (quant_method 'fp8', e.g. Qwen/Qwen3-Coder-30B-A3B-Instruct-FP8), whose "
            "weights it dequantizes on load. Use the model's unquantized checkpoint "
            "(e.g. Qwen/Qwen3-Coder-30B-A3B-Instruct)"
        )
    return True


def _fp8_block(raw: dict[str, Any]) -> tuple[int, int] | None:
    block = raw["quantization_config"].get("weight_block_size")
    if block is None:
        return None
    if not isinstance(block, list) or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(f"config.json: quantization_config.weight_block_size must be two positive integers, got {block!r}")
    return (block[0], block[1])


def _rope_from_dict(raw: dict[str, Any]) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ("default", "yarn"):
        raise ValueError(f"unsupported rope type {rope_type!r}: qwenserve supports default and yarn")
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    return RopeConfig(
        theta=float(theta),
        rope_type="yarn",
        factor=float(params.get("factor") or 1.0),
        original_max_position_embeddings=params.get("original_max_position_embeddings")
        or raw.get("max_position_embeddings"),
        attention_factor=params.get("attention_factor"),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


@dataclass
class EngineConfig:
    """Everything the engine needs to know, validated once in __post_init__.

    `model` is a local directory or a hub id; None means the built-in demo model.
    KV memory: `kv_cache_memory` bytes if given, else `gpu_memory_utilization` of the
    GPU (what is left after weights and activations); on CPU a default of 512 MiB.
    """

    model: str | None = None
    dtype: str = "auto"  # auto: bf16 on GPU, float32 on CPU
    device: str = "auto"  # auto: cuda if available
    load_format: str = "auto"  # auto | dummy
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    # None: 8192 on a GPU; 2048 on a CPU, where a chunk of a long prompt takes seconds (smaller chunks let an
    # abort or another session's turn in sooner, and prefilled qwen-code's 17k-token prompt faster: 28 s
    # against 37 s at 8192 on 2 cores).
    max_num_batched_tokens: int | None = None
    max_queued_requests: int = 1024
    gpu_memory_utilization: float = 0.92
    kv_cache_memory: int | None = None
    num_kv_blocks: int | None = None  # exact pool size (tests); overrides the memory budget
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    async_scheduling: bool = True  # launch step N+1 before processing step N's tokens
    seed: int = 0
    use_kernels: bool = True  # Triton kernels on CUDA when available
    tensor_parallel_size: int = 1  # processes (GPUs): attention/dense tensor parallel, MoE expert parallel

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"{_flag('load_format')} must be auto or dummy, got {self.load_format!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"{_flag('dtype')} must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        if not 1 <= self.block_size <= MAX_BLOCK_SIZE or self.block_size & (self.block_size - 1):
            # Larger blocks only lose: the prefix cache shares whole blocks, and a sequence's last block
            # holds pool memory it has not filled yet.
            raise ValueError(
                f"{_flag('block_size')} must be a power of two from 1 to {MAX_BLOCK_SIZE}, got {self.block_size}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"{_flag('gpu_memory_utilization')} must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"{_flag('kv_cache_memory')} must be more than 0 bytes, got {self.kv_cache_memory}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_queued_requests", "tensor_parallel_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        check_device(self.device)
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ValueError(f"{_flag('max_model_len')} must be >= 16, got {self.max_model_len}")


def _flag(field: str) -> str:
    """A config field as the message names it: the field and the `serve` flag that sets it."""
    return f"{field} (--{field.replace('_', '-')})"


def check_device(device: str) -> None:
    """Raise ValueError unless `device` is auto, cpu or cuda[:N] with that GPU present."""
    kind, _, index = device.partition(":")
    if kind in ("auto", "cpu") and not index:
        return
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"--device {device}: no CUDA GPU is available (use --device cpu, or auto)")
    if index and int(index) >= count:
        raise ValueError(f"--device {device}: only {count} CUDA GPU(s) present (cuda:0..cuda:{count - 1})")


def env_number(name: str, default: float, whole: bool = True) -> float:
    """A positive number from environment variable `name` (unset or empty: `default`); a ValueError naming
    the variable otherwise, so a typo there stops the server with a message instead of a traceback."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a {'whole ' if whole else ''}number") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={raw!r}: give a positive number, or unset it")
    return value


def parse_size(text: str) -> int:
    """Parse a memory size such as '20GiB', '512MB', '1.5G' or a plain byte count."""
    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
             "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    if unit not in units or not num:
        raise ValueError(f"cannot read memory size {text!r}: use e.g. 20GiB, 512MiB or a byte count")
    return int(float(num) * units[unit])
