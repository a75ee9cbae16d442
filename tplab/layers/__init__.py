"""The parallel layers: how one matrix (and the embedding, the LM head, RoPE) is split over tp ranks.

* ``linear``: :class:`ColumnParallelLinear` (Y = XA, A = [A_1 … A_p]) and
  :class:`RowParallelLinear` (Y = Σ_r X_r A_r, one all-reduce); the fused :class:`QKVParallelLinear` and
  :class:`MergedColumnParallelLinear` (gate/up);
* ``weights``: the formats a layer's block is stored in, each with its GEMM: dense, prepacked (oneDNN), weight-only
  int8 and fp8 with per-row scales that do not depend on tp;
* ``vocab``: :class:`VocabParallelEmbedding` and :class:`ParallelLMHead`;
* ``rope``: rotary embeddings (Llama 3.1 scaling);
* ``shards``: a rank's block of a full tensor, and who owns each element;
* ``rounding``: how far two fp computations of one linear layer may differ.
"""
from tplab.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from tplab.layers.vocab import ParallelLMHead, VocabParallelEmbedding

__all__ = ["ColumnParallelLinear", "MergedColumnParallelLinear", "ParallelLMHead", "QKVParallelLinear",
           "RowParallelLinear", "VocabParallelEmbedding"]
