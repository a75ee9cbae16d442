"""Column- and row-parallel linear layers (inference only).

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
"""
from __future__ import annotations

import torch
from torch import nn

from tplab.comm.group import Dist
from tplab.layers.quantized import QuantizableLinear, row_absmax
from tplab.layers.shards import shard_tensor
from tplab.specs.sharding import check_divisible


class ColumnParallelLinear(QuantizableLinear):
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
        self.weight = nn.Parameter(torch.empty(local, in_features, dtype=dtype, device=dist.device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(local, dtype=dtype, device=dist.device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, dist: Dist, gather_output: bool = False) -> "ColumnParallelLinear":
        """This rank's shard of a dense ``nn.Linear``: rows [r*n/p, (r+1)*n/p) of W."""
        layer = cls(linear.in_features, linear.out_features, dist, bias=linear.bias is not None,
                    gather_output=gather_output, dtype=linear.weight.dtype)
        tp, rank = dist.world_size, dist.rank
        layer.weight.data.copy_(shard_tensor(linear.weight.detach(), 0, tp, rank, "out_features"))
        if linear.bias is not None:
            layer.bias.data.copy_(shard_tensor(linear.bias.detach(), 0, tp, rank, "out_features"))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"ColumnParallelLinear expects the full input X with {self.in_features} features "
                             f"on every rank, got last dimension {x.shape[-1]}")
        y = self.matmul(x, self.bias)
        return self.dist.all_gather(y, dim=-1) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(local {self.local_shape[0]}), tp={self.dist.world_size}, gather_output={self.gather_output}")


class RowParallelLinear(QuantizableLinear):
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
        self.weight = nn.Parameter(torch.empty(out_features, local, dtype=dtype, device=dist.device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=dist.device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, dist: Dist) -> "RowParallelLinear":
        """This rank's shard of a dense ``nn.Linear``: columns [r*k/p, (r+1)*k/p) of W; the full bias."""
        layer = cls(linear.in_features, linear.out_features, dist, bias=linear.bias is not None,
                    dtype=linear.weight.dtype)
        layer.weight.data.copy_(shard_tensor(linear.weight.detach(), 1, dist.world_size, dist.rank, "in_features"))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def full_row_absmax(self) -> torch.Tensor:
        """max |W_ij| over the full row: this rank's columns' maxima, all-gathered and reduced (one collective)."""
        return self.dist.all_gather(row_absmax(self.weight)[:, None], dim=-1).amax(dim=-1)

    def forward(self, x_local: torch.Tensor) -> torch.Tensor:
        local = self.local_shape[1]
        if x_local.shape[-1] != local:
            raise ValueError(f"RowParallelLinear expects this rank's slice X_r of the input: {local} = "
                             f"{self.in_features}/{self.dist.world_size} features, got {x_local.shape[-1]}. "
                             "Feed it a ColumnParallelLinear's output (gather_output=False) or slice X.")
        y = self.dist.all_reduce(self.matmul(x_local))
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.local_shape[1]}), "
                f"out_features={self.out_features}, tp={self.dist.world_size}")
