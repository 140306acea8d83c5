"""Which slice of every weight a rank holds.

Tensor parallel (attention, dense MLP): rank r owns q heads [r*H/N, (r+1)*H/N) and the kv
heads they read; when there are fewer kv heads than ranks, each kv head is replicated on
the N/KV ranks whose q heads use it. qkv_proj and gate_up_proj are column parallel (output
rows split), o_proj and down_proj row parallel (input columns split, then all_reduce).
Expert parallel (MoE): rank r owns experts [r*E/N, (r+1)*E/N); the router is replicated.
Embedding, lm_head and the norms are replicated: simplest, and the vocab GEMM is a small
part of a step (a vocab-parallel lm_head would need a gather before sampling).

Two entry points share these rules: `shard_checkpoint_tensor` slices Hugging Face tensors
as they stream from safetensors, `shard_param` slices a full tensor in our model's layout
(dummy weights, tests).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from qwenserve.config import ModelConfig


def validate_parallel(cfg: ModelConfig, world_size: int) -> None:
    """Raise ValueError when the model cannot be split over `world_size` ranks."""
    if world_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {world_size}")
    if world_size == 1:
        return
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    problems = []
    if heads % world_size:
        problems.append(f"{heads} attention heads")
    if kv % world_size and world_size % kv:
        problems.append(f"{kv} kv heads (need a multiple or a divisor of the world size)")
    dense_layers = [i for i in range(cfg.num_hidden_layers) if not cfg.layer_is_moe(i)]
    if dense_layers and cfg.intermediate_size % world_size:
        problems.append(f"intermediate size {cfg.intermediate_size}")
    if cfg.is_moe and cfg.num_experts % world_size:
        problems.append(f"{cfg.num_experts} experts")
    if problems:
        raise ValueError(f"tensor_parallel_size {world_size} does not divide the model's {', '.join(problems)}")


def head_ranges(num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> tuple[range, range]:
    """(q heads, kv heads) rank `rank` computes; kv heads are replicated when fewer than ranks."""
    per_rank = num_heads // world_size
    q = range(rank * per_rank, (rank + 1) * per_rank)
    if num_kv_heads >= world_size:
        kv_per_rank = num_kv_heads // world_size
        return q, range(rank * kv_per_rank, (rank + 1) * kv_per_rank)
    group = num_heads // num_kv_heads  # q heads per kv head; a rank's q heads share one kv head
    first = q.start // group
    return q, range(first, first + 1)


def kv_heads_per_rank(cfg: ModelConfig, world_size: int) -> int:
    """KV heads in each rank's cache (the KV pool per rank grows by the same factor)."""
    return len(head_ranges(cfg.num_attention_heads, cfg.num_key_value_heads, 0, world_size)[1])


def expert_range(num_experts: int, rank: int, world_size: int) -> range:
    """The experts `rank` holds under expert parallelism (a contiguous, equal share)."""
    per_rank = num_experts // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def local_routing(
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_start: int, num_local: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) of the routing in this rank's local expert numbering.

    Pairs routed to another rank's experts go to local expert 0 with weight 0: every fused_moe
    backend takes that as it is, with no host sync and static shapes (CUDA graphs), at the cost
    of computing those pairs. Summed over the ranks the outputs equal the full MoE's.
    """
    local_ids = topk_ids - expert_start
    is_local = (local_ids >= 0) & (local_ids < num_local)
    return torch.where(is_local, topk_weights, 0), torch.where(is_local, local_ids, 0)


def _split(size: int, rank: int, world_size: int) -> slice:
    per_rank = size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def _heads(t: torch.Tensor, heads: range, head_dim: int, dim: int) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) of the given heads."""
    return t.narrow(dim, heads.start * head_dim, len(heads) * head_dim)


_ATTN_IN = re.compile(r"^layers\.\d+\.self_attn\.(q|k|v)_proj\.weight$")
_ATTN_OUT = re.compile(r"^layers\.\d+\.self_attn\.o_proj\.weight$")
_DENSE_IN = re.compile(r"^layers\.\d+\.mlp\.(gate|up)_proj\.weight$")
_DENSE_OUT = re.compile(r"^layers\.\d+\.mlp\.down_proj\.weight$")
_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts\.)(\d+)(\.(?:gate|up|down)_proj\.weight)$")
_FUSED_EXPERTS = re.compile(r"^layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")


def shard_checkpoint_tensor(
    name: str, load: Callable[[], torch.Tensor], cfg: ModelConfig, rank: int, world_size: int
) -> tuple[str, torch.Tensor] | None:
    """This rank's part of a Hugging Face checkpoint tensor: (name, slice), or None if it holds none.

    `load` reads the tensor; it is not called for another rank's expert, so a rank reads only
    its own experts' bytes. Per-expert tensors are renamed to the local expert index, so the
    loader's name mapping works unchanged on the smaller model.
    """
    name = name.removeprefix("model.")
    experts = expert_range(cfg.num_experts, rank, world_size)
    if m := _EXPERT.match(name):
        expert = int(m[2])
        if expert not in experts:
            return None
        return f"{m[1]}{expert - experts.start}{m[3]}", load()
    tensor = load()
    if world_size == 1:
        return name, tensor
    q, kv = head_ranges(cfg.num_attention_heads, cfg.num_key_value_heads, rank, world_size)
    if m := _ATTN_IN.match(name):
        return name, _heads(tensor, q if m[1] == "q" else kv, cfg.head_dim, 0)
    if _ATTN_OUT.match(name):
        return name, _heads(tensor, q, cfg.head_dim, 1)
    if _DENSE_IN.match(name):
        return name, tensor[_split(tensor.shape[0], rank, world_size)]
    if _DENSE_OUT.match(name):
        return name, tensor[:, _split(tensor.shape[1], rank, world_size)]
    if _FUSED_EXPERTS.match(name):
        return name, tensor[experts.start : experts.stop]
    return name, tensor


def shard_param(name: str, full: torch.Tensor, cfg: ModelConfig, rank: int, world_size: int) -> torch.Tensor:
    """This rank's slice of one of our model's parameters, given the full tensor (our layout)."""
    if world_size == 1:
        return full
    q, kv = head_ranges(cfg.num_attention_heads, cfg.num_key_value_heads, rank, world_size)
    d = cfg.head_dim
    if name.endswith("self_attn.qkv_proj.weight"):
        q_size, kv_size = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        wq, wk, wv = full.split([q_size, kv_size, kv_size], dim=0)
        return torch.cat([_heads(wq, q, d, 0), _heads(wk, kv, d, 0), _heads(wv, kv, d, 0)])
    if name.endswith("self_attn.o_proj.weight"):
        return _heads(full, q, d, 1)
    if name.endswith("mlp.gate_up_proj.weight"):
        gate, up = full.chunk(2, dim=0)
        rows = _split(gate.shape[0], rank, world_size)
        return torch.cat([gate[rows], up[rows]])
    if name.endswith("mlp.down_proj.weight"):
        return full[:, _split(full.shape[1], rank, world_size)]
    if name.endswith(("mlp.w13", "mlp.w2")):
        experts = expert_range(cfg.num_experts, rank, world_size)
        return full[experts.start : experts.stop]
    return full
