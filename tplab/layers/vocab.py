"""Vocabulary-parallel embedding and LM head.

Both split the vocabulary: the (V, hidden) embedding matrix E is cut into tp
blocks of rows. When tp does not divide V, the vocabulary is padded to
V' = ceil(V/tp) * tp with zero rows, and rank r owns token ids
[r V'/tp, (r+1) V'/tp) (:func:`tplab.specs.sharding.vocab_shard`).

Embedding (one all-reduce): rank r looks up the tokens it owns and writes
zeros for the others, e_r(t) = E[t] if t is in its range else 0. Exactly one
rank owns each token, so sum_r e_r(t) = E[t]: one all-reduce of
(batch, seq, hidden) gives every rank the full embeddings.

LM head: logits = h E_head^T, and rank r computes its own block of columns,
z_r = h E_r^T, shape (..., V'/tp), with no communication. Then either

* :meth:`ParallelLMHead.gather_logits`: one all-gather of the blocks, padding
  columns dropped, gives the full logits (..., V) on every rank; or
* :meth:`ParallelLMHead.greedy`: argmax_t z(t) without ever building the full
  logits. Each rank takes its local max and the (lowest) token id where it
  occurs, padding columns excluded; one all-gather of these (value, id) pairs,
  2 * tp numbers per row, and every rank picks the largest value, the lowest
  rank on ties. Rank ranges ascend, so a tie goes to the lowest token id,
  exactly as torch.argmax does on the full logits.

With tied embeddings (``tie_word_embeddings``) the head reuses the
embedding's shard: the same rows, so the same weight (its format included:
a quantized embedding gives a quantized head).
"""
from __future__ import annotations

import torch

from tplab.checkpoint.sources import StateDictSource, TensorSource
from tplab.comm.group import Dist
from tplab.layers.linear import ParallelLinear
from tplab.layers.weights import DenseWeight
from tplab.specs.sharding import vocab_shard


class _VocabShard(ParallelLinear):
    """A (V'/tp, hidden) block of rows of a vocabulary matrix; padding rows are zero."""

    def __init__(self, vocab_size: int, hidden_size: int, dist: Dist, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size, self.dist = vocab_size, hidden_size, dist
        self.start, self.stop, self.real_stop = vocab_shard(vocab_size, dist.world_size, dist.rank)
        self.weight = DenseWeight(self.stop - self.start, hidden_size, dtype, dist.device, fill=0.0)

    @property
    def num_real(self) -> int:
        """Rows of this shard that are real tokens (the rest are padding)."""
        return self.real_stop - self.start

    def load(self, source: TensorSource, name: str):
        """Fill the real rows [start, real_stop) of ``name`` (a (V, hidden) tensor); padding stays zero."""
        if self.num_real:  # a rank of a tiny vocabulary may own padding only
            self.weight.load_block(source, name, slice(0, self.num_real), 0, self.start, self.real_stop)
        return self

    @classmethod
    def from_dense(cls, weight: torch.Tensor, dist: Dist):
        """This rank's shard of a dense (V, hidden) matrix (nn.Embedding.weight or lm_head.weight)."""
        layer = cls(weight.shape[0], weight.shape[1], dist, dtype=weight.dtype)
        return layer.load(StateDictSource({"weight": weight}), "weight")

    def extra_repr(self) -> str:
        padded = (self.stop - self.start) * self.dist.world_size
        return (f"vocab={self.vocab_size} (padded {padded}), rows [{self.start}, {self.stop}) "
                f"({self.num_real} real), hidden={self.hidden_size}")


class VocabParallelEmbedding(_VocabShard):
    """E[t] = sum_r e_r(t): each rank embeds the tokens it owns, zeros elsewhere, one all-reduce."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        owned = (ids >= self.start) & (ids < self.real_stop)
        local = torch.where(owned, ids - self.start, torch.zeros_like(ids))
        partial = self.weight.rows(local).masked_fill(~owned[..., None], 0)
        return self.dist.all_reduce(partial)


class ParallelLMHead(_VocabShard):
    """z_r = h E_r^T, this rank's vocabulary block of the logits; gathered, or reduced to a greedy argmax."""

    def tie_to(self, embedding: VocabParallelEmbedding) -> "ParallelLMHead":
        """Share the embedding's shard (tied embeddings): the same rows of the same matrix, in the same format
        (tie again after the embedding's format changed)."""
        if (embedding.start, embedding.stop) != (self.start, self.stop):
            raise ValueError("tied embedding and LM head must own the same vocabulary rows")
        self.weight = embedding.weight
        return self

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """z_r, shape (..., V'/tp); padding columns are 0 (not -inf)."""
        return self.weight.matmul(hidden)

    def gather_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The full logits (..., V) on every rank: one all-gather, padding columns dropped."""
        return self.dist.all_gather(self.local_logits(hidden), dim=-1)[..., :self.vocab_size]

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """argmax over the full vocabulary of the logits, (...,) int64, via one small all-gather.

        Equals torch.argmax(gather_logits(hidden), -1), ties to the lowest token id.
        """
        local = self.local_logits(hidden)
        local[..., self.num_real:] = float("-inf")
        value, index = local.max(dim=-1)  # first (lowest) index of the maximum
        pair = torch.stack([value.double(), (index + self.start).double()], dim=-1)
        pairs = self.dist.all_gather(pair, dim=-1).unflatten(-1, (self.dist.world_size, 2))
        best_rank = pairs[..., 0].argmax(dim=-1, keepdim=True)  # first maximum: the lowest rank
        return pairs[..., 1].gather(-1, best_rank).squeeze(-1).long()
