"""Fused column-parallel layers of a Llama block, and shard loading for the row-parallel ones.

Notation as in :mod:`tplab.layers.linear`: Y = X W^T with W an nn.Linear weight of
shape (out_features, in_features); column parallel gives rank r a block of W's
rows (output features), row parallel a block of W's columns.

* :class:`QKVParallelLinear`: one matmul for this rank's query, key and value
  heads, [Q_r K_r V_r] = X [Wq_r; Wk_r; Wv_r]^T. Wq_r holds the rows of the
  query heads rank r owns, Wk_r and Wv_r the rows of its KV heads (see
  :func:`tplab.specs.sharding.gqa_heads`; when tp > num_kv_heads a KV head's rows are
  copied to tp/num_kv_heads ranks). No communication: attention is per head.
* :class:`MergedColumnParallelLinear`: the SwiGLU gate and up projections,
  [G_r U_r] = X [Wg_r; Wu_r]^T with rows [r I/tp, (r+1) I/tp) of each. Then
  H_r = silu(G_r) * U_r is elementwise, so it stays local too.
* :func:`load_row_parallel`: o_proj and down_proj are row parallel
  (:class:`tplab.layers.RowParallelLinear`): rank r reads columns
  [r k/tp, (r+1) k/tp) of W; one all-reduce sums the partial products.

Every layer fills its shards through a :class:`tplab.checkpoint.sources.TensorSource`
(``load``), so a checkpoint on disk and a dense nn.Linear in memory
(``from_linears``) go through the same slicing code.
"""
from __future__ import annotations

import torch
from torch import nn

from tplab.checkpoint.sources import StateDictSource, TensorSource
from tplab.comm.group import Dist
from tplab.layers.linear import RowParallelLinear
from tplab.layers.quantized import QuantizableLinear
from tplab.specs.sharding import check_divisible, gqa_heads, shard_range


def _linears_source(**linears: nn.Linear) -> StateDictSource:
    """A source whose tensors are ``<key>.weight`` (and ``<key>.bias``) of the given layers."""
    tensors = {}
    for key, linear in linears.items():
        tensors[f"{key}.weight"] = linear.weight
        if linear.bias is not None:
            tensors[f"{key}.bias"] = linear.bias
    return StateDictSource(tensors)


class QKVParallelLinear(QuantizableLinear):
    """[Q_r K_r V_r] = X [Wq_r; Wk_r; Wv_r]^T + b_r: this rank's query heads and KV heads in one matmul."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, dist: Dist,
                 bias: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.q_heads, self.kv_heads = gqa_heads(num_heads, num_kv_heads, dist.world_size, dist.rank)
        self.head_dim, self.hidden_size, self.dist = head_dim, hidden_size, dist
        self.q_size = len(self.q_heads) * head_dim
        self.kv_size = len(self.kv_heads) * head_dim
        rows = self.q_size + 2 * self.kv_size
        self.weight = nn.Parameter(torch.empty(rows, hidden_size, dtype=dtype, device=dist.device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(rows, dtype=dtype, device=dist.device), requires_grad=False) if bias else None

    def _parts(self, q_name: str, k_name: str, v_name: str):
        """(name, first row in the fused weight, first row in the source, number of rows) for q, k, v."""
        d = self.head_dim
        return [
            (q_name, 0, self.q_heads.start * d, self.q_size),
            (k_name, self.q_size, self.kv_heads.start * d, self.kv_size),
            (v_name, self.q_size + self.kv_size, self.kv_heads.start * d, self.kv_size),
        ]

    def load(self, source: TensorSource, q_name: str, k_name: str, v_name: str) -> "QKVParallelLinear":
        """Fill this rank's rows from ``<q_name>.weight`` etc. (names without the ``.weight`` suffix)."""
        for name, at, start, n in self._parts(q_name, k_name, v_name):
            self.load_block(source, name, slice(at, at + n), 0, start, start + n)
            if self.bias is not None:
                source.copy_into(self.bias[at:at + n], f"{name}.bias", 0, start, start + n)
        return self

    @classmethod
    def from_linears(cls, q: nn.Linear, k: nn.Linear, v: nn.Linear, num_heads: int, num_kv_heads: int,
                     dist: Dist) -> "QKVParallelLinear":
        """This rank's fused shard of dense q, k, v projections."""
        layer = cls(q.in_features, num_heads, num_kv_heads, q.out_features // num_heads, dist,
                    bias=q.bias is not None, dtype=q.weight.dtype)
        return layer.load(_linears_source(q=q, k=k, v=v), "q", "k", "v")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Q_r, K_r, V_r), shapes (..., local_heads * head_dim) and (..., local_kv_heads * head_dim)."""
        return self.matmul(x, self.bias).split([self.q_size, self.kv_size, self.kv_size], dim=-1)

    def extra_repr(self) -> str:
        return (f"q_heads={list(self.q_heads)}, kv_heads={list(self.kv_heads)}, head_dim={self.head_dim}, "
                f"hidden_size={self.hidden_size}, bias={self.bias is not None}")


class MergedColumnParallelLinear(QuantizableLinear):
    """[G_r U_r] = X [Wg_r; Wu_r]^T + b_r: rows [r I/tp, (r+1) I/tp) of the gate and of the up projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, dist: Dist, bias: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_divisible("intermediate_size", intermediate_size, dist.world_size)
        self.hidden_size, self.intermediate_size, self.dist = hidden_size, intermediate_size, dist
        self.local = intermediate_size // dist.world_size
        self.weight = nn.Parameter(torch.empty(2 * self.local, hidden_size, dtype=dtype, device=dist.device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(2 * self.local, dtype=dtype, device=dist.device), requires_grad=False)
                     if bias else None)

    def load(self, source: TensorSource, gate_name: str, up_name: str) -> "MergedColumnParallelLinear":
        """Fill this rank's rows from ``<gate_name>.weight`` and ``<up_name>.weight`` (and biases)."""
        start, stop = shard_range(self.intermediate_size, self.dist.world_size, self.dist.rank, "intermediate_size")
        for at, name in ((0, gate_name), (self.local, up_name)):
            self.load_block(source, name, slice(at, at + self.local), 0, start, stop)
            if self.bias is not None:
                source.copy_into(self.bias[at:at + self.local], f"{name}.bias", 0, start, stop)
        return self

    @classmethod
    def from_linears(cls, gate: nn.Linear, up: nn.Linear, dist: Dist) -> "MergedColumnParallelLinear":
        """This rank's merged shard of dense gate and up projections."""
        layer = cls(gate.in_features, gate.out_features, dist, bias=gate.bias is not None, dtype=gate.weight.dtype)
        return layer.load(_linears_source(gate=gate, up=up), "gate", "up")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(G_r, U_r), each of shape (..., intermediate_size / tp)."""
        return self.matmul(x, self.bias).chunk(2, dim=-1)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size} "
                f"(local {self.local} gate + {self.local} up), bias={self.bias is not None}")


def load_row_parallel(layer: RowParallelLinear, source: TensorSource, name: str) -> RowParallelLinear:
    """Fill a RowParallelLinear from ``<name>.weight``: columns [r k/tp, (r+1) k/tp); the full bias (added once)."""
    dist = layer.dist
    start, stop = shard_range(layer.in_features, dist.world_size, dist.rank, "in_features")
    layer.load_block(source, name, slice(None), 1, start, stop)
    if layer.bias is not None:
        source.copy_into(layer.bias.data, f"{name}.bias")
    return layer
