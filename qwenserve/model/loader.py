"""Find a Hugging Face checkpoint (local dir or hub id) and load it into our model.

Weights go shard by shard, tensor by tensor, straight to the target device and dtype,
so the host never holds the whole model. The `dummy` format draws random normal
weights on the device instead, for full-size benchmarks without a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from qwenserve.config import ModelConfig
from qwenserve.distributed.sharding import shard_checkpoint_tensor, shard_param
from qwenserve.model.qwen3 import Ops, Qwen3ForCausalLM
from qwenserve.model.safetensors_stream import (
    BUFFER_BYTES,
    StagedCopier,
    TensorEntry,
    check_shard,
    read_header,
)

logger = logging.getLogger(__name__)

_CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


class ModelNotFoundError(RuntimeError):
    """The model could not be located; the message says what to do."""


def is_hub_id(model: str) -> bool:
    """Whether `model` reads as a Hugging Face hub id (owner/name, not an existing path) rather than a path."""
    return not (Path(model).expanduser().exists() or model.startswith((".", "/", "~")) or model.count("/") != 1)


def resolve_model_path(model: str) -> Path:
    """Return a local directory for `model`: a path as given, else a hub id from the HF cache.

    The local cache is tried first; when that misses we download unless the hub is
    unreachable or HF_HUB_OFFLINE is set, in which case the error says how to get it.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} has no config.json: point --model at a Hugging Face model directory")
        return path
    if not is_hub_id(model):
        raise ModelNotFoundError(
            f"model {model!r} is neither a local directory nor a Hugging Face hub id (owner/name)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=_CHECKPOINT_PATTERNS, local_files_only=True))
    except Exception as cache_miss:  # noqa: BLE001 - any cache miss falls through to a download
        cache_miss_kind = type(cache_miss).__name__
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):  # huggingface_hub's reading
        raise ModelNotFoundError(
            f"{model} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: run "
            f"`hf download {model}` on a machine with network access (older huggingface_hub: "
            f"`huggingface-cli download`), or pass --model /path/to/dir (no local directory {model!r} exists)"
        )
    logger.info("%s not in the local Hugging Face cache (%s); downloading", model, cache_miss_kind)
    try:
        return Path(snapshot_download(model, allow_patterns=_CHECKPOINT_PATTERNS))
    except Exception as err:  # noqa: BLE001 - network, auth and 404 errors all end here with one message
        raise ModelNotFoundError(
            f"could not download {model} from the Hugging Face hub ({type(err).__name__}: {err}). If this machine "
            f"is offline, download it elsewhere with `hf download {model}` and pass --model /path/to/the/dir "
            f"(no local directory {model!r} exists); for a gated repo, run `hf auth login` first"
        ) from err


def load_model_config(path: Path) -> ModelConfig:
    """Read config.json, then take the EOS ids from generation_config.json when it lists them."""
    cfg = ModelConfig.from_file(path / "config.json")
    gen = read_generation_config(path)
    eos = gen.get("eos_token_id")
    if eos is not None:
        cfg.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
    return cfg


def read_generation_config(path: Path) -> dict[str, Any]:
    """The model's generation_config.json (its sampling defaults), or {} when it has none."""
    gen_path = path / "generation_config.json"
    if not gen_path.exists():
        return {}
    with open(gen_path, encoding="utf-8") as f:
        try:
            gen = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{gen_path} is not valid JSON ({exc}): is the checkpoint download complete?") from exc
    if not isinstance(gen, dict):
        raise ValueError(f"{gen_path} is not a JSON object")
    return gen


def build_model(
    cfg: ModelConfig,
    path: Path | None,
    device: torch.device,
    dtype: torch.dtype,
    load_format: str = "auto",
    ops: Ops | None = None,
    max_positions: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Qwen3ForCausalLM:
    """Create the model directly on `device` and fill it from safetensors (or randomly for dummy).

    With world_size > 1 only this rank's shard is built and loaded (qwenserve.distributed.sharding).
    """
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg, ops=ops, max_positions=max_positions, rank=rank, world_size=world_size)
    model = model.to(dtype).to_empty(device=device)  # cast on meta first: never materialise float32
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if load_format == "dummy" and world_size > 1:
        _init_dummy_shard(model, cfg, seed, rank, world_size)
    elif load_format == "dummy":
        _init_dummy(model, cfg, seed)
    else:
        if path is None:
            raise ValueError("a checkpoint path is required unless load_format is dummy")
        _load_safetensors(model, cfg, path, device, rank, world_size)
    model.init_rope(device)
    model.eval()
    return model


@torch.no_grad()
def _init_dummy(model: Qwen3ForCausalLM, cfg: ModelConfig, seed: int) -> None:
    """Normal(0, initializer_range) for matrices, ones for norms: a trained model's scale, so MoE routing
    spreads over experts the way it would on real weights."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, cfg.initializer_range, generator=gen)


@torch.no_grad()
def _init_dummy_shard(model: Qwen3ForCausalLM, cfg: ModelConfig, seed: int, rank: int, world_size: int) -> None:
    """The dummy weights of world size 1, sliced: every rank draws each full tensor in the same
    order from the same generator and keeps its part, so N ranks serve the same model as one."""
    with torch.device("meta"):
        full_model = Qwen3ForCausalLM(cfg)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    params = dict(model.named_parameters())
    for name, meta_param in full_model.named_parameters():
        param = params[name]
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        full = torch.empty(meta_param.shape, dtype=param.dtype, device=device)
        full.normal_(0.0, cfg.initializer_range, generator=gen)
        param.copy_(shard_param(name, full, cfg, rank, world_size))
        del full


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index} is not a safetensors index ({exc!r}): download it again") from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
        if missing := [file.name for file in files if not file.exists()]:
            raise ModelNotFoundError(
                f"{path} is an incomplete download: its index lists {', '.join(missing[:3])}"
                f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}, not there; download it again"
            )
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors weights in {path} (pass --load-format dummy for random weights)")
    for file in files:
        check_shard(file)
    return files


_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_FUSED_EXPERTS = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_ATTN = re.compile(r"^layers\.(\d+)\.self_attn\.(q|k|v)_proj\.weight$")
_DENSE = re.compile(r"^layers\.(\d+)\.mlp\.(gate|up)_proj\.weight$")


def _target(
    model: Qwen3ForCausalLM, cfg: ModelConfig, params: dict[str, torch.Tensor], name: str
) -> tuple[torch.Tensor, tuple] | None:
    """Map a checkpoint tensor name to (destination parameter, index into it); None to skip."""
    name = name.removeprefix("model.")
    inter = cfg.moe_intermediate_size
    if m := _EXPERT.match(name):
        layer, expert, kind = int(m[1]), int(m[2]), m[3]
        mlp = model.layers[layer].mlp
        if kind == "down":
            return mlp.w2, (expert,)
        rows = slice(0, inter) if kind == "gate" else slice(inter, 2 * inter)
        return mlp.w13, (expert, rows)
    if m := _FUSED_EXPERTS.match(name):
        mlp = model.layers[int(m[1])].mlp
        return (mlp.w13, ()) if m[2] == "gate_up_proj" else (mlp.w2, ())
    if m := _ATTN.match(name):
        attn = model.layers[int(m[1])].self_attn
        start = {"q": 0, "k": attn.q_size, "v": attn.q_size + attn.kv_size}[m[2]]
        size = attn.q_size if m[2] == "q" else attn.kv_size
        return attn.qkv_proj.weight, (slice(start, start + size),)
    if m := _DENSE.match(name):
        mlp = model.layers[int(m[1])].mlp
        rows = slice(0, mlp.inter) if m[2] == "gate" else slice(mlp.inter, 2 * mlp.inter)
        return mlp.gate_up_proj.weight, (rows,)
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return None
    if name in params:
        return params[name], ()
    return None


_FP8_DTYPES = frozenset(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
# The multiplier of an FP8 weight `x.weight`: `x.weight_scale_inv` (block scales, as Qwen and DeepSeek publish
# them) or `x.weight_scale` (one per tensor or per output row, as vLLM's FP8 checkpoints hold it).
_SCALE_SUFFIXES = ("_scale_inv", "_scale")


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """An FP8 weight ([..., rows, cols]) as float32, times `scale`: one value for the whole tensor, one per
    row ([..., rows] or [..., rows, 1]), or one per [block rows x block cols] tile ([..., ceil(rows / block
    rows), ceil(cols / block cols)], `block` from the checkpoint's weight_block_size)."""
    values = weight.to(torch.float32)
    scale = scale.to(torch.float32)
    if scale.numel() == 1:
        return values * scale.reshape(())
    rows, cols = values.shape[-2:]
    if tuple(scale.shape) in (tuple(values.shape[:-1]), (*values.shape[:-1], 1)):
        return values * scale.reshape(*values.shape[:-1], 1)
    if block is None:
        raise ValueError(
            f"an FP8 weight of shape {tuple(values.shape)} has scales of shape {tuple(scale.shape)}, which need "
            "quantization_config.weight_block_size in config.json"
        )
    block_rows, block_cols = block
    expected = (*values.shape[:-2], -(-rows // block_rows), -(-cols // block_cols))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"an FP8 weight of shape {tuple(values.shape)} in {block_rows}x{block_cols} blocks needs scales of "
            f"shape {expected}, got {tuple(scale.shape)}"
        )
    if rows % block_rows == 0 and cols % block_cols == 0:  # whole tiles: no full-size scale tensor
        lead = values.shape[:-2]
        tiles = values.view(*lead, rows // block_rows, block_rows, cols // block_cols, block_cols)
        return tiles.mul_(scale[..., :, None, :, None]).view(values.shape)
    full = scale.repeat_interleave(block_rows, -2)[..., :rows, :].repeat_interleave(block_cols, -1)[..., :cols]
    return values * full


class _CheckpointReader:
    """Reads tensors by name from open safetensors shards; FP8 weights come back dequantized (float32)."""

    def __init__(self, shards: dict[str, Any], fp8_block: tuple[int, int] | None) -> None:
        self.shards = shards  # tensor name -> the open shard that holds it
        self.fp8_block = fp8_block

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` from its shard, FP8 weights multiplied by their scale."""
        tensor = self.shards[name].get_tensor(name)
        if tensor.dtype not in _FP8_DTYPES:
            return tensor
        scale_name = next((name + s for s in _SCALE_SUFFIXES if name + s in self.shards), None)
        if scale_name is None:
            raise ValueError(
                f"{name} is stored in {tensor.dtype} but the checkpoint has no {name}_scale_inv or {name}_scale "
                "to dequantize it with"
            )
        return dequantize_fp8(tensor, self.shards[scale_name].get_tensor(scale_name), self.fp8_block)


# The streamed reader (safetensors_stream) for a plain checkpoint on one device; safetensors' own reader
# where tensors need more than a copy (FP8 scales, a tensor-parallel rank's slices). Benchmarks flip it.
STREAMED_LOAD = True


@torch.no_grad()
def _load_safetensors(
    model: Qwen3ForCausalLM, cfg: ModelConfig, path: Path, device: torch.device, rank: int = 0, world_size: int = 1
) -> None:
    files = _shard_files(path)
    expected = {n for n, _ in model.named_parameters()}
    if STREAMED_LOAD and world_size == 1 and not cfg.fp8:
        filled = _load_streamed(model, cfg, files)
    else:
        filled = _load_per_tensor(model, cfg, files, device, rank, world_size)
    missing = expected - filled
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for: {', '.join(sorted(missing)[:8])}")


def _progress(files: list[Path], device: torch.device) -> Any:
    return tqdm(files, desc="Loading weights", unit="shard", disable=len(files) < 2 and device.type == "cpu")


def _load_streamed(model: Qwen3ForCausalLM, cfg: ModelConfig, files: list[Path]) -> set[str]:
    """Each shard read in long runs and copied into the parameters it names; the names filled."""
    params = dict(model.named_parameters(remove_duplicate=False))
    param_names = {id(p): n for n, p in model.named_parameters()}
    device = model.embed_tokens.weight.device
    filled: set[str] = set()
    # Buffers no larger than the largest shard (a small model's whole file).
    copier = StagedCopier(device, min(BUFFER_BYTES, max(file.stat().st_size for file in files)))
    try:
        for file in _progress(files, device):
            jobs = _shard_jobs(model, cfg, params, file)
            filled.update(param_names[id(param)] for _, _, param in jobs)
            copier.copy_shard(file, [(entry, dest) for entry, dest, _ in jobs])
    finally:
        copier.close()
    return filled


def _shard_jobs(
    model: Qwen3ForCausalLM, cfg: ModelConfig, params: dict[str, torch.nn.Parameter], file: Path
) -> list[tuple[TensorEntry, torch.Tensor, torch.nn.Parameter]]:
    """(entry, destination, parameter) for each tensor of `file` the model reads, in file order, checked."""
    jobs = []
    for entry in read_header(file):
        target = _target(model, cfg, params, entry.name)
        if target is None:
            continue
        param, index = target
        if entry.dtype is None:
            raise ValueError(f"{file.name}: {entry.name} is stored in a dtype this loader does not read")
        dest = param[index] if index else param
        if tuple(dest.shape) != entry.shape:
            raise ValueError(f"{file.name}: {entry.name} has shape {entry.shape}, expected {tuple(dest.shape)}")
        jobs.append((entry, dest, param))
    return jobs


def _load_per_tensor(
    model: Qwen3ForCausalLM, cfg: ModelConfig, files: list[Path], device: torch.device, rank: int, world_size: int
) -> set[str]:
    """safetensors' reader, tensor by tensor (FP8 weights dequantized, a rank's slices cut); the names filled."""
    filled: set[str] = set()
    param_names = {id(p): n for n, p in model.named_parameters()}
    params = dict(model.named_parameters(remove_duplicate=False))
    if cfg.fp8:
        dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
        logger.info("FP8 checkpoint: its weights are dequantized to %s as they load", dtype)
    # safetensors reads a tensor straight onto CUDA; on CPU it memory-maps the file.
    load_device = str(device) if device.type == "cuda" else "cpu"
    with contextlib.ExitStack() as stack:
        # Every shard is opened up front (headers only) so an FP8 weight finds its scale in any of them.
        opened = {file: stack.enter_context(safe_open(str(file), framework="pt", device=load_device)) for file in files}
        reader = _CheckpointReader({n: shard for shard in opened.values() for n in shard.keys()}, cfg.fp8_weight_block)
        for file in _progress(files, device):
            for name in opened[file].keys():
                if name.endswith(_SCALE_SUFFIXES):
                    continue  # read with their weights
                tensor = None
                if world_size > 1:
                    # This rank's slice, with expert indices made local; None: another rank's expert.
                    sliced = shard_checkpoint_tensor(name, lambda n=name: reader.get(n), cfg, rank, world_size)
                    if sliced is None:
                        continue
                    name, tensor = sliced
                target = _target(model, cfg, params, name)
                if target is None:
                    continue
                param, index = target
                if tensor is None:
                    tensor = reader.get(name)
                dest = param[index] if index else param
                if dest.shape != tensor.shape:
                    raise ValueError(f"{file.name}: {name} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
                dest.copy_(tensor)
                filled.add(param_names[id(param)])
    return filled
