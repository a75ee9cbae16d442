"""Sharding with tensors: a rank's block of a full tensor, and a map of which rank owns each weight element.

The arithmetic (which block rank r owns) is :mod:`tplab.specs.sharding`; these
are its tensor forms, for building shards from a full layer and for drawing them.
"""
from __future__ import annotations

import torch

from tplab.specs.sharding import check_divisible, shard_range


def shard_tensor(full: torch.Tensor, dim: int, tp: int, rank: int, name: str = "dim") -> torch.Tensor:
    """A contiguous copy of rank's block of ``full`` along ``dim``."""
    start, stop = shard_range(full.shape[dim], tp, rank, name)
    return full.narrow(dim, start, stop - start).contiguous()


def ownership_map(rows: int, cols: int, tp: int, split_dim: int) -> torch.Tensor:
    """A (rows, cols) integer map whose entries say which rank holds that weight element.

    ``split_dim=0`` splits the rows (a column-parallel nn.Linear weight, whose
    rows are output features); ``split_dim=1`` splits the columns (row-parallel).
    """
    if split_dim not in (0, 1):
        raise ValueError(f"split_dim must be 0 (split rows) or 1 (split columns), got {split_dim!r}")
    size = (rows, cols)[split_dim]
    check_divisible(("rows", "cols")[split_dim], size, tp)
    owner = torch.arange(size) // (size // tp)
    return owner[:, None].expand(rows, cols) if split_dim == 0 else owner[None, :].expand(rows, cols)
