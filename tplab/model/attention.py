"""Attention over a cache: which key slots each query reads, and grouped-query attention that reads K, V in place.

Both caches use these: the static one (:mod:`tplab.model.kv_cache`) for its
left-padded rows, the paged one (:mod:`tplab.model.paged_cache`) for its
decodes (left-aligned the same way) and for each prefill chunk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_mask(query_slots: torch.Tensor, key_valid: torch.Tensor, window: int | None) -> torch.Tensor:
    """(batch, 1, T, S) bool, True where query slot q may read key slot s.

    s <= q, s holds a real token of that row (or s == q), and q - s < window
    when the layer slides. In one row, slots and positions differ by a
    constant (the row's left padding), so slot distances are position distances.
    """
    keys = torch.arange(key_valid.shape[1], device=key_valid.device)
    distance = query_slots[:, None] - keys[None, :]  # (T, S)
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    real = key_valid[:, None, :] | (distance == 0)[None]  # (batch, T, S)
    return (allowed[None] & real)[:, None]


def grouped_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                            scale: float) -> torch.Tensor:
    """O_h = softmax(Q_h K_g^T * scale, masked) V_g for every query head h, with g = h // G.

    q is (batch, KV*G, T, d); keys and values are (batch, KV, S, d), read where they lie.
    The G query heads that share KV head g are stacked along the query axis,
    Q'_g = [Q_{gG}; ...; Q_{gG+G-1}] of shape (G*T, d), so one attention call per KV head
    serves all G of them and K, V are never copied G times (repeat_interleave would write
    G copies of the whole cache every decode step). The mask (batch, 1, T, S) is tiled G
    times along the query axis to match; ``mask`` None reads every key (one query over a full cache). Returns
    (batch, KV*G, T, d).
    """
    batch, heads, tokens, head_dim = q.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    stacked = q.reshape(batch, kv_heads, groups * tokens, head_dim)
    if mask is not None and groups > 1:
        mask = mask.repeat(1, 1, groups, 1)
    out = F.scaled_dot_product_attention(stacked, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(batch, heads, tokens, head_dim)


def paged_decode_attention(q: torch.Tensor, store_k: torch.Tensor, store_v: torch.Tensor, read_slots: torch.Tensor,
                           valid: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per row over its keys where they lie in the blocks: o_h = sum_j p_hj V_g[s_j], with
    p_h = softmax_j(q_h . K_g[s_j] * scale) over the valid j, s_j = ``read_slots[row, j]`` and g = h // G.

    q is (rows, KV*G, d); ``store_k`` and ``store_v`` are one layer's blocks, (slots, KV, d); ``read_slots`` and
    ``valid`` are (rows, S). Written as products and sums rather than matmuls so that ``torch.compile`` fuses each
    gather ``store[read_slots]`` into the reduction that reads it: the compiled function is a paged-attention
    kernel that reads every key and value once, in place, and never copies them (eagerly it materializes the
    products and is slow: the eager engine gathers and calls :func:`grouped_query_attention` instead).
    Computed in float32; returns (rows, KV*G, d) in q's dtype.
    """
    rows, heads, head_dim = q.shape
    kv_heads = store_k.shape[1]
    query = q.reshape(rows, 1, kv_heads, heads // kv_heads, head_dim).float()  # (rows, 1, KV, G, d)
    keys = store_k[read_slots].float()[:, :, :, None]  # (rows, S, KV, 1, d)
    scores = (query * keys).sum(-1) * scale  # (rows, S, KV, G)
    weights = scores.masked_fill(~valid[:, :, None, None], float("-inf")).softmax(dim=1)
    values = store_v[read_slots].float()[:, :, :, None]  # (rows, S, KV, 1, d)
    return (weights[..., None] * values).sum(1).reshape(rows, heads, head_dim).to(q.dtype)
