"""Small rank programs that the notebooks and ``python -m tplab demo`` run.

They live in the package (not in notebooks) because the gloo backend spawns
processes, which can only run functions they can import.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from tplab.comm.collectives import naive_all_reduce, ring_all_reduce
from tplab.comm.group import Dist
from tplab.layers.linear import ColumnParallelLinear, RowParallelLinear
from tplab.layers.shards import shard_tensor


def with_comm_record(dist: Dist, program: Callable[..., Any], *args: Any, **kwargs: Any) -> dict:
    """Run another rank program; return {"out": its result, "comm": this rank's ``dist.stats.summary()``}."""
    dist.stats.reset()
    out = program(dist, *args, **kwargs)
    return {"out": out, "comm": dist.stats.summary()}


def column_parallel_forward(dist: Dist, linear: nn.Linear, x: torch.Tensor, gather_output: bool = True) -> torch.Tensor:
    """Y (or this rank's Y_r) from this rank's column shard of ``linear``."""
    return ColumnParallelLinear.from_linear(linear, dist, gather_output=gather_output)(x)


def column_shard_beside_its_slice(dist: Dist, linear: nn.Linear, x: torch.Tensor) -> dict:
    """This rank's ColumnParallelLinear output Y_r = X A_r + b_r, beside ``F.linear`` on the same rows of W and b.

    Both are computed here, in this rank's thread with its BLAS threads, from contiguous copies of the same
    slice: the same operation on the same data, so their bits must match on any machine (against the dense
    layer, only the rounding bound holds: the kernel for a narrower matrix may add in another order).
    """
    tp, rank = dist.world_size, dist.rank
    weight = shard_tensor(linear.weight.detach(), 0, tp, rank, "out_features")
    bias = shard_tensor(linear.bias.detach(), 0, tp, rank, "out_features") if linear.bias is not None else None
    return {"out": ColumnParallelLinear.from_linear(linear, dist)(x),
            "same_op_same_slice": torch.nn.functional.linear(x, weight, bias)}


def row_parallel_forward(dist: Dist, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Y from this rank's row shard of ``linear``, given the full X (each rank takes its X_r)."""
    layer = RowParallelLinear.from_linear(linear, dist)
    return layer(shard_tensor(x, -1, dist.world_size, dist.rank, "in_features"))


def megatron_mlp_forward(dist: Dist, up: nn.Linear, down: nn.Linear, x: torch.Tensor) -> dict:
    """Y = GELU(X A) B with A column-parallel and B row-parallel: one all-reduce in all.

    Returns the output and this rank's collective record.
    """
    column = ColumnParallelLinear.from_linear(up, dist, gather_output=False)
    row = RowParallelLinear.from_linear(down, dist)
    dist.stats.reset()
    y = row(torch.nn.functional.gelu(column(x)))
    return {"y": y, "comm": dist.stats.summary(), "local_up_weight": tuple(column.weight.shape)}


def unpaired_mlp_forward(dist: Dist, up: nn.Linear, down: nn.Linear, x: torch.Tensor) -> dict:
    """The same MLP without Megatron's pairing: A's output is gathered, then each rank slices its X_r for B.

    Same Y as :func:`megatron_mlp_forward`, but an all-gather more per MLP.
    """
    column = ColumnParallelLinear.from_linear(up, dist, gather_output=True)
    dist.stats.reset()
    y = row_parallel_forward(dist, down, torch.nn.functional.gelu(column(x)))
    return {"y": y, "comm": dist.stats.summary()}


def every_collective(dist: Dist) -> dict:
    """Each collective once on a small readable input: rank r holds x_r = [10r, 10r+1, ..., 10r+2n-1]."""
    n = dist.world_size
    x = torch.arange(2 * n, dtype=torch.float32) + 10 * dist.rank
    return {
        "x": x.clone(),
        "all_reduce": dist.all_reduce(x.clone()),
        "all_gather": dist.all_gather(x, dim=-1),
        "reduce_scatter": dist.reduce_scatter(x.clone(), dim=-1),
        "broadcast": dist.broadcast(x.clone(), src=0),
        "counts": dist.stats.counts(),
    }


def compare_all_reduces(dist: Dist, numel: int, seed: int = 0) -> dict:
    """Naive, ring and ``Dist.all_reduce`` of the same random input, with the bytes each one sent."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed + dist.rank))
    out = {}
    for name, algorithm in (("naive", naive_all_reduce), ("ring", ring_all_reduce),
                            ("all_reduce", lambda d, t: d.all_reduce(t.clone()))):
        record = with_comm_record(dist, algorithm, x)
        out[name] = record["out"]
        out[name + "_bytes_sent"] = record["comm"].get("send", {}).get("bytes", 0)
    return out
