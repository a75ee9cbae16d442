"""Small rank programs that the notebooks and ``python -m tplab demo`` run.

They live in the package (not in notebooks) because the gloo backend spawns
processes, which can only run functions they can import.
"""
from __future__ import annotations

import torch
from torch import nn

from tplab.dist import Dist
from tplab.layers import ColumnParallelLinear, RowParallelLinear


def column_parallel_forward(dist: Dist, linear: nn.Linear, x: torch.Tensor, gather_output: bool = True) -> torch.Tensor:
    """Y (or this rank's Y_r) from this rank's column shard of ``linear``."""
    return ColumnParallelLinear.from_linear(linear, dist, gather_output=gather_output)(x)


def row_parallel_forward(dist: Dist, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Y from this rank's row shard of ``linear``, given the full X (each rank takes its X_r)."""
    layer = RowParallelLinear.from_linear(linear, dist)
    local = x.shape[-1] // dist.world_size
    return layer(x[..., dist.rank * local:(dist.rank + 1) * local])


def megatron_mlp_forward(dist: Dist, up: nn.Linear, down: nn.Linear, x: torch.Tensor) -> dict:
    """Y = GELU(X A) B with A column-parallel and B row-parallel: one all-reduce in all.

    Returns the output and this rank's collective record.
    """
    column = ColumnParallelLinear.from_linear(up, dist, gather_output=False)
    row = RowParallelLinear.from_linear(down, dist)
    dist.stats.reset()
    y = row(torch.nn.functional.gelu(column(x)))
    return {"y": y, "comm": dist.stats.summary(), "local_up_weight": tuple(column.weight.shape)}
