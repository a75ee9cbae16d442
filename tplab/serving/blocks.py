"""Which KV block holds what: block tables, reference counts and a prefix cache, in pure Python.

The cache has ``num_blocks`` blocks of ``block_size`` tokens each (on every
rank, each holding its own KV heads of them: :mod:`tplab.model.paged_cache`).
A sequence's block table lists the blocks of its positions in order.

**Prefix caching.** A *full* block is named by a hash of its tokens and of
the hash of the block before it, h_j = H(h_{j-1}, tokens[j·bs, (j+1)·bs)), so
equal hashes mean an equal prefix from position 0: equal keys and values. When
a sequence is admitted, its leading full blocks are looked up; each hit is
shared (its reference count goes up) and those tokens are not computed again.
A block whose count falls to 0 returns to the free list but keeps its
contents and hash, so a later request can still hit it until it is handed out
again (the least recently freed go first). At least one token of a sequence is
always computed, since its last hidden state gives the next token.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tplab.checks import is_positive_int
from tplab.serving.requests import Sequence


def check_block_size(name: str, size: int) -> None:
    """ValueError naming ``name`` unless ``size`` is a positive power of two (8, 16, 32, ...)."""
    if not is_positive_int(size) or size & (size - 1):
        raise ValueError(f"{name} must be a positive power of two (8, 16, 32, ...), got {size!r}")


def block_hash(previous: int | None, tokens: tuple[int, ...]) -> int:
    """H(h_{j-1}, tokens of block j): Python's hash of a tuple of ints, which is the same in every process."""
    return hash((previous, tokens))


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and registered
    tokens: tuple[int, ...] = ()


class BlockManager:
    """``num_blocks`` blocks of ``block_size`` tokens; ``prefix_caching`` shares equal full prefix blocks."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        check_block_size("block_size", block_size)
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest freed first
        self.by_hash: dict[int, int] = {}
        self.lookups = self.hits = 0  # tokens looked up in the prefix cache, and found

    @property
    def used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - len(self.free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks of ``seq``'s leading full blocks (never its last token), in order, until the first miss."""
        if not self.prefix_caching:
            return []
        found, previous = [], None
        for j in range((len(seq.tokens) - 1) // self.block_size):
            chunk = tuple(seq.tokens[j * self.block_size:(j + 1) * self.block_size])
            previous = block_hash(previous, chunk)
            block_id = self.by_hash.get(previous)
            if block_id is None or self.blocks[block_id].tokens != chunk:
                break
            found.append(block_id)
        return found

    def can_admit(self, seq: Sequence, new_tokens: int, cached: list[int]) -> bool:
        """Whether ``seq`` (no blocks yet) can take ``cached`` and enough free blocks for ``new_tokens`` more."""
        fresh = self.blocks_for(len(cached) * self.block_size + new_tokens) - len(cached)
        revived = sum(1 for b in cached if b in self.free)
        return fresh + revived <= len(self.free)

    def admit(self, seq: Sequence, cached: list[int]) -> None:
        """Give ``seq`` the ``cached`` blocks: their tokens count as computed (a prefix hit)."""
        self.lookups += len(seq.tokens)
        self.hits += len(cached) * self.block_size
        for block_id in cached:
            self.free.pop(block_id, None)
            self.blocks[block_id].ref_count += 1
        seq.block_ids = list(cached)
        seq.num_computed = seq.prefix_hit_tokens = len(cached) * self.block_size

    def can_grow(self, seq: Sequence, new_tokens: int) -> bool:
        return self.blocks_for(seq.num_computed + new_tokens) - len(seq.block_ids) <= len(self.free)

    def grow(self, seq: Sequence, new_tokens: int) -> None:
        """Add free blocks to ``seq``'s table until it holds num_computed + ``new_tokens`` positions."""
        for _ in range(self.blocks_for(seq.num_computed + new_tokens) - len(seq.block_ids)):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None and self.by_hash.get(block.hash) == block_id:
                del self.by_hash[block.hash]
            block.hash, block.tokens, block.ref_count = None, (), 1
            seq.block_ids.append(block_id)

    def register_full(self, seq: Sequence) -> None:
        """Name ``seq``'s computed full blocks by their prefix hash, so later requests can share them: only those
        that filled since the last call (``seq.registered_blocks``), so a step costs its new blocks, not the
        sequence's length."""
        if not self.prefix_caching:
            return
        first = seq.registered_blocks
        previous = self.blocks[seq.block_ids[first - 1]].hash if first else None
        for j in range(first, seq.num_computed // self.block_size):
            block = self.blocks[seq.block_ids[j]]
            if block.hash is None:
                block.tokens = tuple(seq.tokens[j * self.block_size:(j + 1) * self.block_size])
                block.hash = block_hash(previous, block.tokens)
                self.by_hash.setdefault(block.hash, block.id)
            previous = block.hash
        seq.registered_blocks = max(first, seq.num_computed // self.block_size)

    def release(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; blocks nobody holds go to the end of the free list (contents kept)."""
        for block_id in reversed(seq.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_ids, seq.registered_blocks = [], 0
