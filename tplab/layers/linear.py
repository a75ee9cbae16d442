"""The parallel linears of a Llama block (inference only): column, row, fused QKV and merged gate/up.

Notation: Y = X A + b with X of shape (..., k) and A of shape (k, n). PyTorch's
nn.Linear stores W = A^T, shape (n, k), and computes Y = X W^T + b.

Column parallel: split A by columns, A = [A_1 ... A_p] (W by rows). Rank r
computes Y_r = X A_r + b_r, its own n/p output features; no communication.
Concatenating [Y_1 ... Y_p] (an all-gather) gives Y exactly: each output element
is the same dot product as in the dense layer.

Row parallel: split A by rows, A = [A_1; ...; A_p] (W by columns), and X by
columns, X = [X_1 ... X_p]. Then X A = X_1 A_1 + ... + X_p A_p: rank r computes
the partial product X_r A_r and one all-reduce sums them. The bias is added
once, after the sum (adding it on every rank would add it p times). The sum of
p partial dot products is a different floating-point summation order than one
dense dot product, so the result differs from the dense layer by rounding
(about 1e-7 relative in fp32).

Megatron's MLP pattern: column parallel (no gather) feeds row parallel (input
already split), so a whole MLP costs exactly one all-reduce.

The fused layers of a Llama block: :class:`QKVParallelLinear`, [Q_r K_r V_r] = X [Wq_r; Wk_r; Wv_r]^T, the rows
of this rank's query heads and of their KV heads (:func:`tplab.specs.sharding.gqa_heads`; a KV head is copied to
tp/num_kv_heads ranks when tp > num_kv_heads); :class:`MergedColumnParallelLinear`, [G_r U_r] = X [Wg_r; Wu_r]^T,
rows [r I/tp, (r+1) I/tp) of the SwiGLU gate and up, so H_r = silu(G_r) * U_r stays local. o_proj and down_proj
are row parallel (:func:`load_row_parallel`). No communication until the row-parallel all-reduce.

A layer keeps the split and the collective; its ``weight`` is a format (:mod:`tplab.layers.weights`: dense,
prepacked, int8 or fp8) that stores the block and runs the GEMM. Every layer fills its shard through a
:class:`~tplab.checkpoint.sources.TensorSource`: a checkpoint on disk and a dense nn.Linear in memory
(``from_linear(s)``) go through the same slicing code.
"""
from __future__ import annotations

import torch
from torch import nn

from tplab.checkpoint.sources import StateDictSource, TensorSource
from tplab.comm.group import Dist
from tplab.layers.shards import shard_tensor
from tplab.layers.weights import DenseWeight, QuantizedWeight, WeightFormat
from tplab.specs.sharding import check_divisible, gqa_heads, shard_range


class ParallelLinear(nn.Module):
    """What every parallel linear shares: a block of W in some format (``weight``), and changing that format.

    ``full_row_absmax`` is the one sharding-aware part of quantization: the max |W| over the full rows this
    rank's scales cover (its own rows here; a row-parallel layer all-gathers it).
    """

    weight: WeightFormat

    def _dense(self, rows: int, cols: int, dtype: torch.dtype | None, device: torch.device) -> None:
        self.weight = DenseWeight(rows, cols, dtype, device)

    @property
    def local_shape(self) -> torch.Size:
        """The shape of this rank's block, as stored."""
        return self.weight.shape

    def full_row_absmax(self) -> torch.Tensor:
        return self.weight.row_absmax()

    def quantize_(self, scheme: str) -> "ParallelLinear":
        """Weight-only int8 or fp8, with per-row scales that do not depend on tp (:mod:`tplab.layers.weights`)."""
        if not isinstance(self.weight, DenseWeight):
            raise ValueError(f"this layer's weight is already {type(self.weight).__name__}: quantize a dense one")
        self.weight = self.weight.quantized(scheme, self.full_row_absmax())
        return self

    def prepack_(self) -> "ParallelLinear":
        """The weight in oneDNN's blocked layout (CPU): the same Y through a faster kernel."""
        self.weight = self.weight.prepacked()
        return self

    def prepare_quantized_(self, scheme: str) -> "ParallelLinear":
        """Room for a block stored quantized in the checkpoint, in place of the dense weight."""
        rows, cols = self.weight.shape
        self.weight = QuantizedWeight.empty(rows, cols, scheme, self.weight.dtype, self.weight.tensor.device)
        return self

class ColumnParallelLinear(ParallelLinear):
    """Y_r = X A_r + b_r: this rank's ``out_features / tp`` output features.

    With ``gather_output=True`` the shards are all-gathered so every rank
    returns the full Y; otherwise Y_r stays split for a following row-parallel
    layer.
    """

    def __init__(self, in_features: int, out_features: int, dist: Dist, bias: bool = True,
                 gather_output: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_divisible("out_features", out_features, dist.world_size)
        self.in_features, self.out_features = in_features, out_features
        self.dist, self.gather_output = dist, gather_output
        local = out_features // dist.world_size
        self._dense(local, in_features, dtype, dist.device)
        self.bias = nn.Parameter(torch.zeros(local, dtype=dtype, device=dist.device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, dist: Dist, gather_output: bool = False) -> "ColumnParallelLinear":
        """This rank's shard of a dense ``nn.Linear``: rows [r*n/p, (r+1)*n/p) of W."""
        layer = cls(linear.in_features, linear.out_features, dist, bias=linear.bias is not None,
                    gather_output=gather_output, dtype=linear.weight.dtype)
        tp, rank = dist.world_size, dist.rank
        layer.weight.tensor.data.copy_(shard_tensor(linear.weight.detach(), 0, tp, rank, "out_features"))
        if linear.bias is not None:
            layer.bias.data.copy_(shard_tensor(linear.bias.detach(), 0, tp, rank, "out_features"))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"ColumnParallelLinear expects the full input X with {self.in_features} features "
                             f"on every rank, got last dimension {x.shape[-1]}")
        y = self.weight.matmul(x, self.bias)
        return self.dist.all_gather(y, dim=-1) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(local {self.local_shape[0]}), tp={self.dist.world_size}, gather_output={self.gather_output}")


class RowParallelLinear(ParallelLinear):
    """Y = sum_r X_r A_r + b: one all-reduce, bias added once after it.

    The input is already split along its last dimension (rank r holds X_r, the
    output of a column-parallel layer).
    """

    def __init__(self, in_features: int, out_features: int, dist: Dist, bias: bool = True,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_divisible("in_features", in_features, dist.world_size)
        self.in_features, self.out_features = in_features, out_features
        self.dist = dist
        local = in_features // dist.world_size
        self._dense(out_features, local, dtype, dist.device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=dist.device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, dist: Dist) -> "RowParallelLinear":
        """This rank's shard of a dense ``nn.Linear``: columns [r*k/p, (r+1)*k/p) of W; the full bias."""
        layer = cls(linear.in_features, linear.out_features, dist, bias=linear.bias is not None,
                    dtype=linear.weight.dtype)
        layer.weight.tensor.data.copy_(shard_tensor(linear.weight.detach(), 1, dist.world_size, dist.rank,
                                                    "in_features"))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def full_row_absmax(self) -> torch.Tensor:
        """max |W_ij| over the full row: this rank's columns' maxima, all-gathered and reduced (one collective)."""
        return self.dist.all_gather(self.weight.row_absmax()[:, None], dim=-1).amax(dim=-1)

    def forward(self, x_local: torch.Tensor) -> torch.Tensor:
        local = self.local_shape[1]
        if x_local.shape[-1] != local:
            raise ValueError(f"RowParallelLinear expects this rank's slice X_r of the input: {local} = "
                             f"{self.in_features}/{self.dist.world_size} features, got {x_local.shape[-1]}. "
                             "Feed it a ColumnParallelLinear's output (gather_output=False) or slice X.")
        y = self.dist.all_reduce(self.partial(x_local))
        return y + self.bias if self.bias is not None else y

    def partial(self, x_local: torch.Tensor) -> torch.Tensor:
        """X_r A_r, this rank's term of the sum, before any all-reduce (and without the bias): for a caller that adds
        several row-parallel outputs and reduces them once (the experts of a mixture)."""
        return self.weight.matmul(x_local)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.local_shape[1]}), "
                f"out_features={self.out_features}, tp={self.dist.world_size}")


def _linears_source(**linears: nn.Linear) -> StateDictSource:
    """A source whose tensors are ``<key>.weight`` (and ``<key>.bias``) of the given layers."""
    tensors = {}
    for key, linear in linears.items():
        tensors[f"{key}.weight"] = linear.weight
        if linear.bias is not None:
            tensors[f"{key}.bias"] = linear.bias
    return StateDictSource(tensors)


class QKVParallelLinear(ParallelLinear):
    """[Q_r K_r V_r] = X [Wq_r; Wk_r; Wv_r]^T + b_r: this rank's query heads and KV heads in one matmul."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, dist: Dist,
                 bias: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.q_heads, self.kv_heads = gqa_heads(num_heads, num_kv_heads, dist.world_size, dist.rank)
        self.head_dim, self.hidden_size, self.dist = head_dim, hidden_size, dist
        self.q_size = len(self.q_heads) * head_dim
        self.kv_size = len(self.kv_heads) * head_dim
        rows = self.q_size + 2 * self.kv_size
        self._dense(rows, hidden_size, dtype, dist.device)
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
            self.weight.load_block(source, f"{name}.weight", slice(at, at + n), 0, start, start + n)
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
        return self.weight.matmul(x, self.bias).split([self.q_size, self.kv_size, self.kv_size], dim=-1)

    def extra_repr(self) -> str:
        return (f"q_heads={list(self.q_heads)}, kv_heads={list(self.kv_heads)}, head_dim={self.head_dim}, "
                f"hidden_size={self.hidden_size}, bias={self.bias is not None}")


class MergedColumnParallelLinear(ParallelLinear):
    """[G_r U_r] = X [Wg_r; Wu_r]^T + b_r: rows [r I/tp, (r+1) I/tp) of the gate and of the up projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, dist: Dist, bias: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_divisible("intermediate_size", intermediate_size, dist.world_size)
        self.hidden_size, self.intermediate_size, self.dist = hidden_size, intermediate_size, dist
        self.local = intermediate_size // dist.world_size
        self._dense(2 * self.local, hidden_size, dtype, dist.device)
        self.bias = (nn.Parameter(torch.empty(2 * self.local, dtype=dtype, device=dist.device), requires_grad=False)
                     if bias else None)

    def load(self, source: TensorSource, gate_name: str, up_name: str) -> "MergedColumnParallelLinear":
        """Fill this rank's rows from ``<gate_name>.weight`` and ``<up_name>.weight`` (and biases)."""
        start, stop = shard_range(self.intermediate_size, self.dist.world_size, self.dist.rank, "intermediate_size")
        for at, name in ((0, gate_name), (self.local, up_name)):
            self.weight.load_block(source, f"{name}.weight", slice(at, at + self.local), 0, start, stop)
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
        return self.weight.matmul(x, self.bias).chunk(2, dim=-1)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size} "
                f"(local {self.local} gate + {self.local} up), bias={self.bias is not None}")


def load_row_parallel(layer: RowParallelLinear, source: TensorSource, name: str) -> RowParallelLinear:
    """Fill a RowParallelLinear from ``<name>.weight``: columns [r k/tp, (r+1) k/tp); the full bias (added once)."""
    dist = layer.dist
    start, stop = shard_range(layer.in_features, dist.world_size, dist.rank, "in_features")
    layer.weight.load_block(source, f"{name}.weight", slice(None), 1, start, stop)
    if layer.bias is not None:
        source.copy_into(layer.bias.data, f"{name}.bias")
    return layer
