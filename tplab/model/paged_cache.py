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

One step (:class:`PagedBatch`) runs rows at different positions: row b has
``context_b`` tokens cached and feeds ``new_b`` more (a decode feeds 1, a
prefill chunk many). The new tokens are right-padded to T = max new_b;
attention reads, per row, the gathered slots of positions [0, context_b +
new_b), so in the gathered view a token's slot is its position. Gathering
copies the keys a step reads (a paged-attention kernel reads them in place);
on a CPU at these sizes the copy is small beside the GEMMs.
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
    """One step of rows at their own positions, read and written through their block tables.

    It is the ``cache`` argument of :meth:`tplab.model.TPCausalLM.forward`: the
    model asks it where the new tokens go (:meth:`query_slots`), how many slots
    attention reads (:meth:`visible`), which of them hold real tokens
    (:meth:`key_valid`), and has it store and gather each layer's keys and values (:meth:`write`).
    """

    def __init__(self, cache: PagedKVCache, tables: list[list[int]], context_lens: list[int],
                 new_lens: list[int]) -> None:
        if not len(tables) == len(context_lens) == len(new_lens) > 0:
            raise ValueError("a paged batch needs one block table, context length and new length per row")
        if min(new_lens) < 1:
            raise ValueError(f"every row feeds at least one token, got new_lens={new_lens}")
        self.cache, device, size = cache, cache.k.device, cache.block_size
        ends = [c + n for c, n in zip(context_lens, new_lens)]
        for b, (table, end) in enumerate(zip(tables, ends)):
            if len(table) * size < end:
                raise ValueError(f"row {b} reaches position {end} but its {len(table)} block(s) hold {len(table) * size}")
        self.tokens, self.width = max(new_lens), max(ends)
        self.new_lens = torch.tensor(new_lens, device=device)
        t = torch.arange(self.tokens, device=device)
        self.real = t[None, :] < self.new_lens[:, None]  # (batch, T): a real new token, not padding
        positions = torch.tensor(context_lens, device=device)[:, None] + t[None, :]
        self.positions = torch.where(self.real, positions, 0)  # padding queries sit at slot 0 and read only it
        s = torch.arange(self.width, device=device)
        self._key_valid = s[None, :] < torch.tensor(ends, device=device)[:, None]
        covering = -(-self.width // size)  # blocks covering the widest row; a row's unused entries read block 0
        block_of = torch.tensor([table[:covering] + [0] * (covering - len(table)) for table in tables], device=device)
        read = block_of.gather(1, (s // size).expand(len(tables), -1)) * size + s % size
        self.read_slots = torch.where(self._key_valid, read, 0)  # (batch, S): flat slots attention gathers
        self.write_slots = self.read_slots.gather(1, self.positions)[self.real]  # (new tokens,) in row order

    @property
    def last_index(self) -> torch.Tensor:
        """(batch,): the index of each row's last new token, whose hidden state predicts the next one."""
        return self.new_lens - 1

    def query_slots(self, start: int, tokens: int) -> torch.Tensor:
        """(batch, T): the new tokens' slots in the gathered view, which are their positions (0 on padding)."""
        return self.positions

    def visible(self, start: int, tokens: int) -> int:
        """S = max over rows of context + new: the gathered view's width."""
        return self.width

    def key_valid(self, visible: int) -> torch.Tensor:
        """(batch, S) bool: slot s of row b holds one of its context + new tokens."""
        return self._key_valid

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the real new tokens' k, v (batch, local_kv_heads, T, head_dim) in their blocks; return every
        row's keys and values gathered to (batch, local_kv_heads, S, head_dim)."""
        store_k, store_v = self.cache.k[layer], self.cache.v[layer]
        store_k.index_copy_(0, self.write_slots, k.transpose(1, 2)[self.real])
        store_v.index_copy_(0, self.write_slots, v.transpose(1, 2)[self.real])
        return store_k[self.read_slots].transpose(1, 2), store_v[self.read_slots].transpose(1, 2)
