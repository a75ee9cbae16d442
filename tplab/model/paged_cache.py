"""A paged KV cache: this rank's KV heads in fixed-size blocks, any block serving any sequence.

The static cache (:mod:`tplab.model.kv_cache`) gives every row max_len slots up
front. A serving engine does not know how long a request will run, so it
hands out memory in blocks of ``block_size`` tokens as a sequence grows
(vLLM's PagedAttention, nano-vllm's block manager). Sequence i owns a *block
table* ``[b_0, b_1, ...]``: its position p lives in block b_{p // block_size}
at offset p % block_size, i.e. at flat slot

    slot(p) = b_{p // block_size} * block_size + p % block_size.

Every rank holds its own KV heads' slice of every block (``kv_heads_per_rank``
heads), and one block table, made by the scheduler, serves all ranks: TP
divides each block's bytes by tp, never the number of blocks.

Layout: ``k`` and ``v`` are (layers, num_blocks * block_size, local_kv_heads,
head_dim). Bytes per block on one rank:

    2 (k and v) * layers * block_size * local_kv_heads * head_dim * bytes_per_element

One step (:class:`PagedBatch`) runs sequences at different positions:
sequence b has ``context_b`` tokens cached and feeds ``new_b`` more (a decode
feeds 1, a prefill chunk many). Their N = sum new_b tokens are *packed* into
one row (1, N), so the linear layers multiply exactly N tokens, with no
padding. Attention then reads each sequence's own keys through its block table:

* the decodes together, as one batch: row b's keys gathered left-padded to
  the longest, so every query sits at the last slot (the static cache's layout);
* each prefill chunk alone: its n_b queries over its context_b + n_b keys, causal.

Gathering copies the keys a step reads, and the decodes' keys are copied once
more into the (rows, heads, keys, head_dim) layout that the CPU's attention
kernel runs fastest on (with 64 rows of ~100 keys on a 2-core CPU in bf16: 7.5 ms
a layer against 17 ms on the strided view). That is the readable path. A
paged-attention kernel reads the keys in place instead: given ``decode_kernel``
(:func:`tplab.model.attention.paged_decode_attention` compiled, from
:meth:`tplab.engine.ModelRunner.start_paged`), the decodes call it on the
blocks and their slots, and no key is copied.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from tplab.checks import is_positive_int
from tplab.model.attention import attention_mask, grouped_query_attention
from tplab.specs.model import ModelConfig


class PagedKVCache:
    """This rank's slice of every block: ``k``, ``v`` of (layers, num_blocks * block_size, local_kv_heads, head_dim).

    ``decode_kernel``: what the decodes' attention calls on the blocks in place, with the signature of
    :func:`~tplab.model.attention.paged_decode_attention`; None gathers their keys and calls
    :func:`~tplab.model.attention.grouped_query_attention`.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, local_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 decode_kernel: Callable[..., torch.Tensor] | None = None) -> None:
        sizes = dict(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                     local_kv_heads=local_kv_heads, head_dim=head_dim)
        bad = {k: v for k, v in sizes.items() if not is_positive_int(v)}
        if bad:
            raise ValueError(f"PagedKVCache sizes must be positive integers, got {bad}")
        self.num_blocks, self.block_size, self.decode_kernel = num_blocks, block_size, decode_kernel
        shape = (num_layers, num_blocks * block_size, local_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, config: ModelConfig, tp: int, num_blocks: int, block_size: int,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  layers: int | None = None, decode_kernel: Callable[..., torch.Tensor] | None = None
                  ) -> "PagedKVCache":
        """The blocks one rank of a tp-way model holds: its ``kv_heads_per_rank(tp)`` heads of each, for ``layers``
        decoder layers (a pipeline stage's; default all)."""
        return cls(layers or config.num_layers, num_blocks, block_size, config.kv_heads_per_rank(tp), config.head_dim,
                   dtype, device, decode_kernel)

    @property
    def bytes_per_block(self) -> int:
        """2 * layers * block_size * local_kv_heads * head_dim * element size."""
        layers, _, heads, head_dim = self.k.shape
        return 2 * layers * self.block_size * heads * head_dim * self.k.element_size()

    @property
    def total_bytes(self) -> int:
        """bytes_per_block * num_blocks: what this rank allocated."""
        return self.bytes_per_block * self.num_blocks

    def batch(self, tables: list[list[int]], context_lens: list[int], new_lens: list[int]) -> "PagedBatch":
        """One step's view: row b has ``context_lens[b]`` tokens cached and feeds ``new_lens[b]`` more."""
        return PagedBatch(self, tables, context_lens, new_lens)


class PagedBatch:
    """One step's sequences, packed in one row, read and written through their block tables.

    It is the ``step`` of :meth:`tplab.model.TPCausalLM.forward` with
    ``input_ids`` of shape (1, N): the model reads the new tokens'
    ``positions`` (1, N), asks it for the attention masks (:meth:`mask`), and
    has it store each layer's keys and values and attend over them (:meth:`attend`).
    """

    def __init__(self, cache: PagedKVCache, tables: list[list[int]], context_lens: list[int],
                 new_lens: list[int]) -> None:
        if not len(tables) == len(context_lens) == len(new_lens) > 0:
            raise ValueError("a paged batch needs one block table, context length and new length per sequence")
        if min(new_lens) < 1:
            raise ValueError(f"every sequence feeds at least one token, got new_lens={new_lens}")
        self.cache, device, size = cache, cache.k.device, cache.block_size
        ends = [c + n for c, n in zip(context_lens, new_lens)]
        for b, (table, end) in enumerate(zip(tables, ends)):
            if len(table) * size < end:
                raise ValueError(f"sequence {b} reaches position {end} but its {len(table)} block(s) hold "
                                 f"{len(table) * size}")
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)
        new = torch.tensor(new_lens, device=device)
        query_seq = torch.arange(len(tables), device=device).repeat_interleave(new)
        first = new.cumsum(0) - new  # each sequence's first token in the packed row
        positions = torch.tensor(context_lens, device=device)[query_seq] + torch.arange(len(query_seq), device=device) \
            - first[query_seq]  # (N,): context_b + i for the i-th new token of sequence b
        self.positions = positions[None]  # (1, N): the new tokens' positions, sequence after sequence
        self.write_slots = table[query_seq, positions // size] * size + positions % size
        self.last_index = new.cumsum(0) - 1  # each sequence's last new token

        def flat(rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            return table[rows, pos // size] * size + pos % size

        decodes = [b for b, n in enumerate(new_lens) if n == 1]
        self.decode_tokens = first[decodes]
        if decodes:  # left-padded to the longest: row b's position p at slot p + (S - end_b)
            longest = max(ends[b] for b in decodes)
            pos = torch.arange(longest, device=device)[None] - (longest - torch.tensor([ends[b] for b in decodes],
                                                                                        device=device))[:, None]
            self.decode_valid = pos >= 0
            self.decode_read = flat(torch.tensor(decodes, device=device)[:, None], pos.clamp_min(0))
        self.chunks = [(int(first[b]), int(first[b]) + new_lens[b],
                        flat(torch.tensor([b], device=device), torch.arange(ends[b], device=device)),
                        torch.arange(context_lens[b], ends[b], device=device))
                       for b, n in enumerate(new_lens) if n > 1]  # (first token, stop, key slots, positions)

    def mask(self, window: int | None) -> dict:
        """The masks :meth:`attend` reads: the decodes' (each query at the last slot of its left-padded row) and
        each chunk's (causal over its own keys), within ``window`` for a sliding layer."""
        decode = None
        if len(self.decode_tokens):
            longest = self.decode_valid.shape[1]
            decode = attention_mask(torch.tensor([longest - 1], device=self.positions.device), self.decode_valid,
                                    window)
        chunks = [attention_mask(pos, torch.ones(1, len(pos) + int(pos[0]), dtype=torch.bool, device=pos.device),
                                 window) for _, _, _, pos in self.chunks]
        return {"decode": decode, "chunks": chunks}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: dict,
               scale: float) -> torch.Tensor:
        """Store the new tokens' k, v (1, local_kv_heads, N, head_dim) in their blocks, then attention of every
        query q (1, H, N, head_dim) over its own sequence's keys; (1, H, N, head_dim)."""
        store_k, store_v = self.cache.k[layer], self.cache.v[layer]
        store_k.index_copy_(0, self.write_slots, k[0].transpose(0, 1))
        store_v.index_copy_(0, self.write_slots, v[0].transpose(0, 1))
        out = torch.empty_like(q)
        kernel = self.cache.decode_kernel
        if mask["decode"] is not None and kernel is not None:
            rows = q[0].transpose(0, 1)[self.decode_tokens]  # (D, H, head_dim), contiguous
            out[0][:, self.decode_tokens] = kernel(rows, store_k, store_v, self.decode_read, mask["decode"][:, 0, 0],
                                                   scale).transpose(0, 1)
        elif mask["decode"] is not None:
            rows = q[0][:, self.decode_tokens].transpose(0, 1)[:, :, None]  # (D, H, 1, head_dim)
            keys, values = (s[self.decode_read].permute(0, 2, 1, 3).contiguous() for s in (store_k, store_v))
            out[0][:, self.decode_tokens] = grouped_query_attention(rows, keys, values, mask["decode"],
                                                                    scale)[:, :, 0].transpose(0, 1)
        for (begin, stop, slots, _), chunk_mask in zip(self.chunks, mask["chunks"]):
            keys, values = (s[slots].permute(1, 0, 2)[None] for s in (store_k, store_v))
            out[:, :, begin:stop] = grouped_query_attention(q[:, :, begin:stop], keys, values, chunk_mask, scale)
        return out
