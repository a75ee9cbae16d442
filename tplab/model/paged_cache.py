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
padding. Attention gathers every sequence's keys and values, positions
[0, context_b + new_b), side by side into one row of sum (context_b + new_b)
slots, and a block-diagonal mask lets a token read only its own sequence's
keys at or before its position (and within the sliding window, for layers
that have one). Gathering copies the keys a step reads (a paged-attention
kernel reads them in place); on a CPU at these sizes the copy is small beside the GEMMs.
"""
from __future__ import annotations

import torch

from tplab.checks import is_positive_int
from tplab.specs.model import ModelConfig


class PagedKVCache:
    """This rank's slice of every block: ``k``, ``v`` of (layers, num_blocks * block_size, local_kv_heads, head_dim)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, local_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        sizes = dict(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                     local_kv_heads=local_kv_heads, head_dim=head_dim)
        bad = {k: v for k, v in sizes.items() if not is_positive_int(v)}
        if bad:
            raise ValueError(f"PagedKVCache sizes must be positive integers, got {bad}")
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_layers, num_blocks * block_size, local_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, config: ModelConfig, tp: int, num_blocks: int, block_size: int,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "PagedKVCache":
        """The blocks one rank of a tp-way model holds: its ``kv_heads_per_rank(tp)`` heads of each."""
        return cls(config.num_layers, num_blocks, block_size, config.kv_heads_per_rank(tp), config.head_dim,
                   dtype, device)

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

    It is the ``cache`` argument of :meth:`tplab.model.TPCausalLM.forward` with
    ``input_ids`` of shape (1, N): the model asks it for the new tokens'
    positions (:meth:`query_slots`), how many slots attention reads
    (:meth:`visible`), which key each query may read (:meth:`mask`), and has it
    store and gather each layer's keys and values (:meth:`write`).
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

        new, ends_t = torch.tensor(new_lens, device=device), torch.tensor(ends, device=device)
        seqs = torch.arange(len(tables), device=device)
        query_seq, key_seq = seqs.repeat_interleave(new), seqs.repeat_interleave(ends_t)
        first_query, first_key = new.cumsum(0) - new, ends_t.cumsum(0) - ends_t
        positions = ends_t[query_seq] - new[query_seq] + torch.arange(len(query_seq), device=device) \
            - first_query[query_seq]  # (N,): context_b + i for the i-th new token of sequence b
        key_pos = torch.arange(len(key_seq), device=device) - first_key[key_seq]  # (S,): 0 .. end_b - 1 per sequence
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)
        self.positions = positions[None]  # (1, N)
        self.write_slots = table[query_seq, positions // size] * size + positions % size
        self.read_slots = table[key_seq, key_pos // size] * size + key_pos % size
        self._same = query_seq[:, None] == key_seq[None, :]  # (N, S): the query's own sequence
        self._distance = positions[:, None] - key_pos[None, :]
        self.last_index = new.cumsum(0) - 1  # each sequence's last new token

    def query_slots(self, start: int, tokens: int) -> torch.Tensor:
        """(1, N): the new tokens' positions, sequence after sequence."""
        return self.positions

    def visible(self, start: int, tokens: int) -> int:
        """S = sum over sequences of context + new: the slots attention gathers."""
        return self.read_slots.shape[0]

    def key_valid(self, visible: int) -> torch.Tensor:
        """(1, S) all True: every gathered slot holds a token (which query may read it is :meth:`mask`'s)."""
        return torch.ones(1, visible, dtype=torch.bool, device=self.read_slots.device)

    def mask(self, query_slots: torch.Tensor, key_valid: torch.Tensor, window: int | None) -> torch.Tensor:
        """(1, 1, N, S): a token reads the keys of its own sequence at or before its position (within ``window``)."""
        allowed = self._same & (self._distance >= 0)
        if window is not None:
            allowed &= self._distance < window
        return allowed[None, None]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' k, v (1, local_kv_heads, N, head_dim) in their blocks; return every sequence's keys
        and values gathered side by side, (1, local_kv_heads, S, head_dim)."""
        store_k, store_v = self.cache.k[layer], self.cache.v[layer]
        store_k.index_copy_(0, self.write_slots, k[0].transpose(0, 1))
        store_v.index_copy_(0, self.write_slots, v[0].transpose(0, 1))
        return store_k[self.read_slots].transpose(0, 1)[None], store_v[self.read_slots].transpose(0, 1)[None]
