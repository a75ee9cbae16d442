"""Sharding arithmetic: which slice of a full tensor rank r owns.

Pure functions (no communication, no torch.distributed), so notebooks can call
and draw them. The convention throughout tplab: a dimension of size D split
over tp ranks gives rank r the contiguous block [r*D/tp, (r+1)*D/tp).
"""
from __future__ import annotations

import torch


def divisors(n: int) -> list[int]:
    """All positive divisors of n, ascending: the tp degrees that split n evenly."""
    return [d for d in range(1, n + 1) if n % d == 0]


def check_tp(tp: int) -> None:
    """Reject a tp that is not a positive integer."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")


def check_divisible(name: str, size: int, tp: int) -> None:
    """Raise a ValueError naming the dimension and the valid tp values when tp does not divide size."""
    check_tp(tp)
    if size % tp:
        valid = ", ".join(str(d) for d in divisors(size))
        raise ValueError(f"{name}={size} is not divisible by tp={tp}; valid tp: {valid}")


def shard_range(size: int, tp: int, rank: int, name: str = "dim") -> tuple[int, int]:
    """(start, stop) of rank's block when ``size`` is split evenly over ``tp`` ranks."""
    check_divisible(name, size, tp)
    if not 0 <= rank < tp:
        raise ValueError(f"rank={rank} is outside 0..{tp - 1}")
    block = size // tp
    return rank * block, (rank + 1) * block


def shard_tensor(full: torch.Tensor, dim: int, tp: int, rank: int, name: str = "dim") -> torch.Tensor:
    """A contiguous copy of rank's block of ``full`` along ``dim``."""
    start, stop = shard_range(full.shape[dim], tp, rank, name)
    return full.narrow(dim, start, stop - start).contiguous()


def ownership_map(rows: int, cols: int, tp: int, split_dim: int) -> torch.Tensor:
    """A (rows, cols) integer map whose entries say which rank holds that weight element.

    ``split_dim=0`` splits the rows (a column-parallel nn.Linear weight, whose
    rows are output features); ``split_dim=1`` splits the columns (row-parallel).
    """
    size = (rows, cols)[split_dim]
    check_divisible(("rows", "cols")[split_dim], size, tp)
    owner = torch.arange(size) // (size // tp)
    return owner[:, None].expand(rows, cols) if split_dim == 0 else owner[None, :].expand(rows, cols)
