"""Qwen3 and Qwen3-MoE decoder over a paged KV cache.

One forward runs one packed step: the new tokens of every scheduled sequence
concatenated along dim 0 ([T]), described by AttentionMetadata. There is no batch
dimension and no per-sequence loop; attention, KV writes and the experts go through
the `Ops` bundle so Triton kernels can replace the torch reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwenserve.config import ModelConfig
from qwenserve.distributed.parallel import all_reduce
from qwenserve.distributed.sharding import expert_range, head_ranges, local_routing
from qwenserve.model import ops as ref_ops
from qwenserve.model.ops import AttentionMetadata
from qwenserve.model.rope import build_cos_sin_cache


@dataclass
class Ops:
    """The swappable compute functions (torch reference by default)."""

    paged_attention: Callable = ref_ops.paged_attention
    fused_moe: Callable = ref_ops.fused_moe
    rms_norm: Callable = ref_ops.rms_norm
    add_rms_norm: Callable = ref_ops.add_rms_norm
    qk_norm_rope_cache: Callable = ref_ops.qk_norm_rope_cache
    route: Callable = ref_ops.route
    routed_moe: Callable = ref_ops.routed_moe  # route + fused_moe(reduce=False), on one device
    norm_routed_moe: Callable = ref_ops.norm_routed_moe  # add_rms_norm + routed_moe, on one device
    linear: Callable = F.linear
    linear_unreduced: Callable = ref_ops.linear_unreduced  # may return split-K terms [T, S, N]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, ops: Ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """GQA attention with per-head q/k RMSNorm before RoPE (Qwen3).

    With world_size > 1 this rank's heads only (qkv column parallel, o_proj row parallel + all_reduce).
    """

    def __init__(self, cfg: ModelConfig, ops: Ops, rank: int = 0, world_size: int = 1):
        super().__init__()
        q_heads, kv_heads = head_ranges(cfg.num_attention_heads, cfg.num_key_value_heads, rank, world_size)
        self.num_heads = len(q_heads)
        self.num_kv_heads = len(kv_heads)
        self.world_size = world_size
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops)
        self.ops = ops
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, cos_sin_cache: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = self.ops.qk_norm_rope_cache(
            self.ops.linear_unreduced(x, self.qkv_proj.weight), self.q_norm.weight, self.k_norm.weight, cos_sin_cache,
            positions, self.num_heads, self.num_kv_heads, self.head_dim, self.q_norm.eps,
            self.k_cache, self.v_cache, meta.slot_mapping,
        )  # fmt: skip
        out = self.ops.paged_attention(q, self.k_cache, self.v_cache, meta, self.scale)
        out = out.reshape(num_tokens, self.q_size)
        if self.world_size > 1:
            return all_reduce(self.ops.linear(out, self.o_proj.weight))
        # Possibly unreduced split-K terms [T, S, H]: the post-attention norm sums them.
        return self.ops.linear_unreduced(out, self.o_proj.weight)


class DenseMLP(nn.Module):
    """SwiGLU MLP; with world_size > 1 this rank's 1/world of the intermediate columns (+ all_reduce)."""

    def __init__(self, hidden: int, inter: int, world_size: int = 1):
        super().__init__()
        inter //= world_size
        self.inter = inter
        self.world_size = world_size
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        out = self.down_proj(F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter :])
        return all_reduce(out) if self.world_size > 1 else out


class SparseMoE(nn.Module):
    """Router (softmax over experts, top-k, optional renormalisation) and SwiGLU experts.

    With world_size > 1 (expert parallel) this rank holds experts [start, start + E/world) and a
    replicated router; it adds its experts' weighted outputs for every token, all_reduce sums.
    """

    def __init__(self, cfg: ModelConfig, ops: Ops, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        inter = cfg.moe_intermediate_size
        experts = expert_range(cfg.num_experts, rank, world_size)
        self.expert_start, self.world_size = experts.start, world_size
        self.w13 = nn.Parameter(torch.empty(len(experts), 2 * inter, cfg.hidden_size))
        self.w2 = nn.Parameter(torch.empty(len(experts), cfg.hidden_size, inter))
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            # Unreduced [T, k, H]: the next add_rms_norm sums the k terms in its own pass.
            return self.ops.routed_moe(x, self.gate.weight, self.w13, self.w2, self.top_k, self.norm_topk_prob)
        topk_weights, topk_ids = self.ops.route(x, self.gate.weight, self.top_k, self.norm_topk_prob)
        local_weights, local_ids = local_routing(topk_weights, topk_ids, self.expert_start, self.w13.shape[0])
        return all_reduce(self.ops.fused_moe(x, self.w13, self.w2, local_weights, local_ids))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, ops: Ops, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, ops, rank, world_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp: nn.Module = SparseMoE(cfg, ops, rank, world_size) if cfg.layer_is_moe(layer) else DenseMLP(
            cfg.hidden_size, cfg.intermediate_size, world_size
        )

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin_cache: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it); the next layer adds them.

        A MoE layer's output is its k weighted expert terms [T, k, H]: the add sums them.
        """
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.ops.add_rms_norm(
                x, residual, self.input_layernorm.weight, self.input_layernorm.eps
            )
        h = self.self_attn(h, cos_sin_cache, positions, meta)
        norm, mlp = self.post_attention_layernorm, self.mlp
        if isinstance(mlp, SparseMoE) and mlp.world_size == 1:
            return norm.ops.norm_routed_moe(
                h, residual, norm.weight, norm.eps, mlp.gate.weight, mlp.w13, mlp.w2, mlp.top_k, mlp.norm_topk_prob
            )
        h, residual = norm.ops.add_rms_norm(h, residual, norm.weight, norm.eps)
        return mlp(h), residual


class Qwen3ForCausalLM(nn.Module):
    """Qwen3 (dense) and Qwen3-MoE causal LM; which one follows from the config.

    `rank` / `world_size` > 1 build this rank's shard (qwenserve.distributed.sharding); the
    embedding, norms and lm_head stay whole on every rank.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        ops: Ops | None = None,
        max_positions: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        self.cfg = cfg
        self.ops = ops or Ops()
        self.rank, self.world_size = rank, world_size
        # An explicit (empty) weight: Embedding's own normal_ init on the meta device imports torch._dynamo,
        # which creates its cache directory, so a read-only filesystem without a writable temp dir (or an
        # unwritable TORCHINDUCTOR_CACHE_DIR) failed the load. The weights are loaded or drawn afterwards anyway.
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, self.ops, rank, world_size) for i in range(cfg.num_hidden_layers)
        )
        self.num_kv_heads = self.layers[0].self_attn.num_kv_heads  # per rank: the KV cache's head count
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.ops)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.max_positions = max_positions or cfg.max_position_embeddings
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)

    def init_rope(self, device: torch.device) -> None:
        """Build the cos/sin table on the target device (after weights are placed)."""
        self.cos_sin_cache = build_cos_sin_cache(self.cfg.rope, self.cfg.head_dim, self.max_positions, device)

    def bind_kv_cache(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        """Give every attention layer its slice of the paged KV pool."""
        for layer, k_cache, v_cache in zip(self.layers, k_caches, v_caches, strict=True):
            layer.self_attn.k_cache = k_cache
            layer.self_attn.v_cache = v_cache

    def release_kv_cache(self) -> None:
        """Drop every layer's reference to its KV pool, so a pool that is no longer used (the
        profiling probe's) is freed once its runner goes."""
        for layer in self.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm for the packed step."""
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, self.cos_sin_cache, positions, meta)
        return self.ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary for the final hidden states."""
        return self.lm_head(hidden)
