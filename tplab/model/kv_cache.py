"""A static, per-rank KV cache holding only this rank's KV heads.

Attention at a new position needs the keys and values of every earlier
position. Each rank keeps them for its own KV heads only (the heads
:func:`tplab.specs.sharding.gqa_heads` gives it): ``local_kv_heads = KV / tp`` when
tp <= KV, else 1 (a replicated head). So TP divides the cache by tp, until tp
exceeds the number of KV heads; from there every rank holds one head.

Layout: ``k`` and ``v`` are (layers, batch, local_kv_heads, max_len, head_dim),
allocated once for (batch, max_len). Prefill writes slots [0, T), each decode
step writes one slot.

Bytes per token (one position of one sequence, on one rank):

    2 (k and v) * layers * local_kv_heads * head_dim * bytes_per_element
"""
from __future__ import annotations

import torch

from tplab.specs.model import ModelConfig
from tplab.specs.sharding import gqa_heads


def local_kv_heads(config: ModelConfig, tp: int, rank: int = 0) -> int:
    """KV heads one rank holds: KV / tp, or 1 when tp > KV (each head replicated on tp/KV ranks)."""
    return len(gqa_heads(config.num_heads, config.num_kv_heads, tp, rank)[1])


def kv_bytes_per_token(config: ModelConfig, tp: int, dtype: torch.dtype) -> int:
    """2 * layers * local_kv_heads * head_dim * element size: one rank's cache bytes for one position."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * local_kv_heads(config, tp) * config.head_dim * element


class KVCache:
    """This rank's keys and values: (layers, batch, local_kv_heads, max_len, head_dim) each."""

    def __init__(self, num_layers: int, batch: int, max_len: int, local_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        sizes = dict(num_layers=num_layers, batch=batch, max_len=max_len, local_kv_heads=local_kv_heads,
                     head_dim=head_dim)
        bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"KVCache sizes must be positive integers, got {bad}")
        shape = (num_layers, batch, local_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, config: ModelConfig, tp: int, rank: int, batch: int, max_len: int,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        """The cache one rank of a tp-way model needs for ``batch`` sequences of up to ``max_len`` positions."""
        if max_len > config.max_position_embeddings:
            raise ValueError(f"{max_len} positions (prompt + new tokens) exceed the model's context of "
                             f"max_position_embeddings={config.max_position_embeddings}")
        return cls(config.num_layers, batch, max_len, local_kv_heads(config, tp, rank), config.head_dim,
                   dtype, device)

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def bytes_per_token(self) -> int:
        """2 * layers * local_kv_heads * head_dim * element size."""
        _, _, heads, _, head_dim = self.k.shape
        return 2 * self.num_layers * heads * head_dim * self.k.element_size()

    @property
    def total_bytes(self) -> int:
        """bytes_per_token * batch * max_len: what this rank allocated."""
        return self.bytes_per_token * self.batch * self.max_len

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, local_kv_heads, T, head_dim) at slots [start, start+T); return all keys/values up to there."""
        stop = start + k.shape[2]
        if stop > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing slots [{start}, {stop}) overflows it")
        self.k[layer, :, :, start:stop] = k
        self.v[layer, :, :, start:stop] = v
        return self.k[layer, :, :, :stop], self.v[layer, :, :, :stop]
