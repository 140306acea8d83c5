"""The model's replaceable compute: paged attention, KV-cache writes and the MoE experts.

Each function here is the torch reference (the CPU path and the oracle for kernels).
`qwenserve.kernels` provides Triton versions with the same signatures; `select_ops`
picks one set per device so the model code never branches on the backend.

Shapes (T = tokens in the packed step, B = sequences in the step):
- q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim]
- k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
- slot_mapping: [T] int64, block_id * block_size + offset for every new token
- block_tables: [B, max_blocks_per_seq] int32, padded with 0 (block 0 is never handed out)
- context_lens: [B] int32, tokens in the sequence after this step (cached + new)
- query_start_loc: [B + 1] int32, cumulative new-token counts (cu_seqlens_q)
Each sequence's new tokens sit at the end of its context: query i of sequence b is at
position context_lens[b] - query_len[b] + i and attends causally to keys 0..position.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_SCORE_BUDGET = 1 << 26  # attention scores materialised at once by the reference (256 MiB in float32)


@dataclass
class AttentionMetadata:
    """Tensors that describe one packed step to the attention op."""

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_context_len: int
    is_decode_only: bool  # every sequence has exactly one new token
    # Host copies of query_start_loc / context_lens where the step was packed on the host (eager steps):
    # the kernels pick an attention backend per sequence from them without a device sync.
    host_query_start_loc: list[int] | None = None
    host_context_lens: list[int] | None = None
    # (sequence, first row, end row, context length) of the chunks the GPU attention hands to cuDNN: decided at
    # the step's first layer (kernels/attention.py) and kept for the others.
    dense_chunks: list[tuple[int, int, int, int]] | None = None
    # How many programs share each query tile's keys in the Triton prefill launch: decided at the first layer.
    prefill_splits: int | None = None


def linear_unreduced(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T as [T, N]. A backend may return the product as unreduced split-K terms [T, S, N]
    instead (qwenserve.kernels.linear); every consumer of a projection (add_rms_norm,
    norm_routed_moe, qk_norm_rope_cache) sums dim 1 of a 3-D input."""
    return F.linear(x, weight)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store the step's new keys and values into their cache slots."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal GQA attention of the step's queries against each sequence's cached keys.

    The cache must already hold this step's keys (write_kv_cache first). Returns
    [T, num_heads, head_dim]. The reference gathers the sequences' contexts into a padded
    batch and runs one masked SDPA (_padded_attention). Padding costs B x longest query x
    longest context, so when that is more than twice the real work (a long prefill beside
    decodes or a shorter prompt) the decode rows run as one batch and each prefill on its own.
    """
    num_seqs = meta.block_tables.shape[0]
    if num_seqs == 1:
        return _padded_attention(q, k_cache, v_cache, meta, scale)
    starts = meta.query_start_loc.tolist()  # the CPU path: no device sync to speak of
    query_lens = [b - a for a, b in itertools.pairwise(starts)]
    context_lens = meta.context_lens.tolist()
    real = sum(n * c for n, c in zip(query_lens, context_lens, strict=True))
    if num_seqs * max(query_lens) * max(context_lens) <= 2 * real:
        return _padded_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    decodes = [i for i, n in enumerate(query_lens) if n == 1]
    for group in ([decodes] if decodes else []) + [[i] for i, n in enumerate(query_lens) if n > 1]:
        rows = torch.cat([torch.arange(starts[i], starts[i + 1], device=q.device) for i in group])
        lens = [query_lens[i] for i in group]
        index = torch.tensor(group, device=q.device)
        sub = AttentionMetadata(
            slot_mapping=meta.slot_mapping[rows],
            block_tables=meta.block_tables[index],
            context_lens=meta.context_lens[index],
            query_start_loc=torch.tensor([0, *itertools.accumulate(lens)], dtype=meta.query_start_loc.dtype,
                                         device=q.device),
            max_query_len=max(lens),
            max_context_len=max(context_lens[i] for i in group),
            is_decode_only=max(lens) == 1,
        )  # fmt: skip
        out[rows] = _padded_attention(q[rows], k_cache, v_cache, sub, scale)
    return out


def _padded_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """paged_attention as one masked SDPA over the sequences padded to the longest query and context."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_seqs = meta.block_tables.shape[0]
    device = q.device
    max_q, max_ctx = meta.max_query_len, meta.max_context_len

    query_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
    # Padded query layout: token t of sequence b goes to row b, column t - start[b].
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), query_lens, output_size=num_tokens)
    col_of_token = torch.arange(num_tokens, device=device) - meta.query_start_loc[seq_of_token]
    q_pad = q.new_zeros(num_seqs, max_q, num_heads, head_dim)
    q_pad[seq_of_token, col_of_token] = q

    # Gather each sequence's keys/values through its block table.
    key_pos = torch.arange(max_ctx, device=device)
    blocks = meta.block_tables[:, key_pos // block_size].long()  # [B, max_ctx]
    slots = blocks * block_size + key_pos % block_size
    k_seq = k_cache.view(-1, num_kv_heads, head_dim)[slots].to(q.dtype)  # [B, max_ctx, kvh, D]
    v_seq = v_cache.view(-1, num_kv_heads, head_dim)[slots].to(q.dtype)

    q_pos = (meta.context_lens - query_lens)[:, None] + torch.arange(max_q, device=device)[None, :]
    group = num_heads // num_kv_heads
    k_all = k_seq.transpose(1, 2).repeat_interleave(group, dim=1)
    v_all = v_seq.transpose(1, 2).repeat_interleave(group, dim=1)
    q_all = q_pad.transpose(1, 2)  # [B, H, max_q, D]
    # Bound the score matrix (B x H x rows x max_ctx) so a 20k-token prompt does not need gigabytes.
    rows = max(1, _SCORE_BUDGET // max(1, num_seqs * num_heads * max_ctx))
    parts = []
    for r0 in range(0, max_q, rows):
        pos = q_pos[:, r0 : r0 + rows]
        mask = (key_pos[None, None, :] <= pos[:, :, None]) & (key_pos[None, None, :] < meta.context_lens[:, None, None])
        parts.append(
            F.scaled_dot_product_attention(
                q_all[:, :, r0 : r0 + rows], k_all, v_all, attn_mask=mask[:, None, :, :], scale=scale
            )
        )
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]  # [B, H, max_q, D]
    return out.transpose(1, 2)[seq_of_token, col_of_token]


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    reduce: bool = True,
) -> torch.Tensor:
    """Mixture of SwiGLU experts.

    hidden [T, H]; w13 [E, 2I, H] (gate rows then up rows); w2 [E, H, I];
    topk_weights [T, k] (already normalised, float32); topk_ids [T, k] int.
    Returns sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t]) as [T, H], or with
    reduce=False the k weighted terms as [T, k, H] (add_rms_norm sums them).
    """
    num_tokens, top_k = topk_ids.shape
    inter = w2.shape[2]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // top_k
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()  # host sync: CPU reference only
    x_sorted = hidden[token_of]
    out_sorted = torch.empty(order.numel(), hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        gate_up = x_sorted[rows] @ w13[expert].t()
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        out_sorted[rows] = act @ w2[expert].t()
        start += count
    weights = topk_weights.reshape(-1)[order].to(hidden.dtype)
    if not reduce:
        pairs = torch.empty_like(out_sorted)
        pairs[order] = out_sorted * weights[:, None]
        return pairs.view(num_tokens, top_k, -1)
    out = torch.zeros_like(hidden)
    out.index_add_(0, token_of, out_sorted * weights[:, None])
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as the Hugging Face reference does."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the pre-norm of the next sublayer and the new residual.

    x may be [T, k, H], unreduced terms (fused_moe(reduce=False)'s expert outputs, or a projection's
    split-K sums from linear_unreduced): they are summed first and rounded to the residual's dtype.
    """
    if x.dim() == 3:
        x = x.sum(dim=1).to(residual.dtype)
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def qk_norm_rope(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split qkv [T, (H + 2 KVH) * D]; per-head RMSNorm of q and k, then RoPE at `positions`.

    qkv may be linear_unreduced's split-K terms [T, S, (H + 2 KVH) * D]: summed first, in the
    dtype of the norm weights."""
    from qwenserve.model.rope import apply_rope

    if qkv.dim() == 3:
        qkv = qkv.sum(dim=1).to(q_weight.dtype)
    num_tokens = qkv.shape[0]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    cos_sin = cos_sin_cache[positions]
    q = apply_rope(rms_norm(q.view(num_tokens, num_heads, head_dim), q_weight, eps), cos_sin)
    k = apply_rope(rms_norm(k.view(num_tokens, num_kv_heads, head_dim), k_weight, eps), cos_sin)
    return q, k, v.view(num_tokens, num_kv_heads, head_dim)


def qk_norm_rope_cache(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """qk_norm_rope, then the new keys and values written to their cache slots; returns q."""
    q, k, v = qk_norm_rope(qkv, q_weight, k_weight, cos_sin_cache, positions, num_heads, num_kv_heads, head_dim, eps)
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    return q


def routed_moe(
    x: torch.Tensor, gate_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int, renormalize: bool
) -> torch.Tensor:
    """The whole sparse MoE block on one device: route, then fused_moe's unreduced terms [T, k, H]."""
    weights, ids = route(x, gate_weight, top_k, renormalize)
    return fused_moe(x, w13, w2, weights, ids, reduce=False)


def norm_routed_moe(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    gate_weight: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The post-attention add_rms_norm, then routed_moe of the normed rows: (the MoE's
    unreduced terms [T, k, H], the new residual). One op so a backend can fuse the norm
    with the router."""
    h, residual = add_rms_norm(x, residual, norm_weight, eps)
    return routed_moe(h, gate_weight, w13, w2, top_k, renormalize), residual


def route(
    x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (in the activation dtype), then router_topk."""
    return router_topk(F.linear(x, gate_weight), top_k, renormalize, x.dtype)


def router_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts in float32, top-k, optional renormalisation; weights rounded to out_dtype
    as Transformers does before applying them."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(out_dtype), ids
