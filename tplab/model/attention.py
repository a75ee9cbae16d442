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
    if tokens == 1 and q.device.type == "cpu" and torch.compiler.is_compiling():
        # a compiled CPU decode step: the sums below fuse into one generated kernel, where the library's attention
        # kernel costs more to call than a few dozen keys cost to read
        valid = None if mask is None else mask[:, 0, 0]
        return decode_attention(q[:, :, 0], keys.transpose(1, 2), values.transpose(1, 2), valid, scale)[:, :, None]
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    stacked = q.reshape(batch, kv_heads, groups * tokens, head_dim)
    if mask is not None and groups > 1:
        mask = mask.repeat(1, 1, groups, 1)
    out = F.scaled_dot_product_attention(stacked, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(batch, heads, tokens, head_dim)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """One query per row: o_h = sum_j p_hj V_g[j], with p_h = softmax_j(q_h . K_g[j] * scale) over the valid j and
    g = h // G.

    q is (rows, KV*G, d); ``keys`` and ``values`` are (rows, S, KV, d), views or gathers; ``valid`` (rows, S) or
    None (every key). Written as products and sums rather than matmuls so that ``torch.compile`` fuses each product
    (and a gather that made the keys) into the reduction that reads it: one generated kernel that reads every key
    and value once, where they lie. Eagerly it materializes the products and is slow. Computed in float32; returns
    (rows, KV*G, d) in q's dtype.
    """
    rows, heads, head_dim = q.shape
    kv_heads = keys.shape[2]
    query = q.reshape(rows, 1, kv_heads, heads // kv_heads, head_dim).float()  # (rows, 1, KV, G, d)
    scores = (query * keys.float()[:, :, :, None]).sum(-1) * scale  # (rows, S, KV, G)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, :, None, None], float("-inf"))
    weights = scores.softmax(dim=1)
    return (weights[..., None] * values.float()[:, :, :, None]).sum(1).reshape(rows, heads, head_dim).to(q.dtype)


def paged_decode_attention(q: torch.Tensor, store_k: torch.Tensor, store_v: torch.Tensor, read_slots: torch.Tensor,
                           valid: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`decode_attention` over keys where they lie in the blocks: key j of a row is ``store[read_slots[row,
    j]]``. ``store_k`` and ``store_v`` are one layer's blocks, (slots, KV, d); ``read_slots`` and ``valid`` are
    (rows, S). Compiled, the gathers fuse into the reductions: a paged-attention kernel that never copies the keys
    (eagerly the engine gathers and calls :func:`grouped_query_attention` instead).
    """
    return decode_attention(q, store_k[read_slots], store_v[read_slots], valid, scale)
