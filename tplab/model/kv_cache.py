"""A static, per-rank KV cache holding only this rank's KV heads.

Attention at a new position needs the keys and values of every earlier
position. Each rank keeps them for its own KV heads only (the heads
:func:`tplab.specs.sharding.gqa_heads` gives it): ``local_kv_heads = KV / tp``
(:meth:`~tplab.specs.ModelConfig.kv_heads_per_rank`) when
tp <= KV, else 1 (a replicated head). So TP divides the cache by tp, until tp
exceeds the number of KV heads; from there every rank holds one head.

Layout: one tensor per layer for the keys (``keys[layer]``) and one for the values, each (batch, local_kv_heads,
max_len, head_dim), allocated once for (batch, max_len). Separate tensors, not views of one: a compiled step then
updates each layer's slot in place, where a write into a view of one large tensor makes torch.compile copy the
whole cache back at every step. Prefill writes slots [0, T), each decode
step writes one slot. One forward pass sees the cache through a
:class:`StaticStep` (:meth:`KVCache.step`): T new tokens per row at slots
[start, start + T). ``start`` is an int, and attention then sees slots
[0, start + T); or a one-element device tensor, for decode steps whose shapes
never change (a CUDA graph replays them): the write lands at that slot
(``index_copy_``) and attention sees every slot, the causal mask hiding those
not written yet.

Bytes per token (one position of one sequence, on one rank):

    2 (k and v) * layers * local_kv_heads * head_dim * bytes_per_element
"""
from __future__ import annotations

import torch

from tplab.checks import is_positive_int
from tplab.model.attention import attention_mask, grouped_query_attention
from tplab.specs.model import ModelConfig


class KVCache:
    """This rank's keys and values: per layer, (batch, local_kv_heads, max_len, head_dim) each."""

    def __init__(self, num_layers: int, batch: int, max_len: int, local_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        sizes = dict(num_layers=num_layers, batch=batch, max_len=max_len, local_kv_heads=local_kv_heads,
                     head_dim=head_dim)
        bad = {k: v for k, v in sizes.items() if not is_positive_int(v)}
        if bad:
            raise ValueError(f"KVCache sizes must be positive integers, got {bad}")
        shape = (batch, local_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @classmethod
    def for_model(cls, config: ModelConfig, tp: int, batch: int, max_len: int,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  layers: int | None = None) -> "KVCache":
        """The cache one rank of a tp-way model needs for ``batch`` sequences of up to ``max_len`` positions, for
        ``layers`` decoder layers (a pipeline stage's; default all)."""
        if max_len > config.max_position_embeddings:
            raise ValueError(f"{max_len} positions (prompt + new tokens) exceed the model's context of "
                             f"max_position_embeddings={config.max_position_embeddings}")
        return cls(layers or config.num_layers, batch, max_len, config.kv_heads_per_rank(tp), config.head_dim,
                   dtype, device)

    @property
    def k(self) -> torch.Tensor:
        """Every layer's keys stacked, (layers, batch, local_kv_heads, max_len, head_dim): a copy, to inspect."""
        return torch.stack(self.keys)

    @property
    def v(self) -> torch.Tensor:
        """Every layer's values stacked, like :attr:`k`."""
        return torch.stack(self.values)

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    @property
    def bytes_per_token(self) -> int:
        """2 * layers * local_kv_heads * head_dim * element size."""
        _, heads, _, head_dim = self.keys[0].shape
        return 2 * self.num_layers * heads * head_dim * self.keys[0].element_size()

    @property
    def total_bytes(self) -> int:
        """bytes_per_token * batch * max_len: what this rank allocated."""
        return self.bytes_per_token * self.batch * self.max_len

    def step(self, start: int | torch.Tensor, tokens: int, positions: torch.Tensor | None = None,
             key_valid: torch.Tensor | None = None) -> "StaticStep":
        """One forward pass's view: ``tokens`` new tokens per row at slots [start, start + tokens)."""
        return StaticStep(self, start, tokens, positions, key_valid)

    def visible(self, start: int | torch.Tensor, tokens: int) -> int:
        """How many slots attention reads after writing ``tokens`` at ``start``: start + tokens, or every slot."""
        return self.max_len if isinstance(start, torch.Tensor) else start + tokens

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor,
              start: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, local_kv_heads, T, head_dim) at slots [start, start+T); return the keys/values
        attention reads (the first :meth:`visible` slots)."""
        keys, values = self.keys[layer], self.values[layer]
        if isinstance(start, torch.Tensor):
            slots = start + torch.arange(k.shape[2], device=start.device)
            keys.index_copy_(2, slots, k)
            values.index_copy_(2, slots, v)
            return keys, values
        stop = start + k.shape[2]
        if stop > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing slots [{start}, {stop}) overflows it")
        keys[:, :, start:stop] = k
        values[:, :, start:stop] = v
        return keys[:, :, :stop], values[:, :, :stop]


class StaticStep:
    """One forward pass over the static cache: what :meth:`tplab.model.TPCausalLM.forward` asks of its step.

    ``positions`` (batch, T): the RoPE positions of the new tokens (default: their slots). ``key_valid`` (batch,
    >= the slots attention reads) bool: the slots holding real tokens (default: all), e.g. not a row's left
    padding. The paged cache's :class:`~tplab.model.paged_cache.PagedBatch` answers the same three questions:
    where the new tokens sit (``positions``), which keys each query reads (:meth:`mask`), and attention over what
    the cache holds (:meth:`attend`).
    """

    def __init__(self, cache: KVCache, start: int | torch.Tensor, tokens: int, positions: torch.Tensor | None = None,
                 key_valid: torch.Tensor | None = None) -> None:
        self.cache, self.start, self.tokens, self.key_valid = cache, start, tokens, key_valid
        self.slots = start + torch.arange(tokens, device=cache.device)
        self.positions = self.slots.expand(cache.batch, tokens) if positions is None else positions

    def mask(self, window: int | None) -> torch.Tensor | None:
        """Which of the visible slots each new token reads (:func:`~tplab.model.attention.attention_mask`); None
        when one new token reads every visible slot (a decode step without padding, within the window)."""
        visible = self.cache.visible(self.start, self.tokens)
        key_valid = self.key_valid
        if key_valid is None and self.tokens == 1 and isinstance(self.start, int) and (window is None or
                                                                                        window >= visible):
            return None
        if key_valid is None:
            key_valid = torch.ones(self.cache.batch, visible, dtype=torch.bool, device=self.cache.device)
        return attention_mask(self.slots, key_valid[:, :visible], window)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        """Store k, v at the step's slots (:meth:`KVCache.write`), then attention of q over every visible slot,
        (batch, H, T, d)."""
        keys, values = self.cache.write(layer, k, v, self.start)
        return grouped_query_attention(q, keys, values, mask, scale)
