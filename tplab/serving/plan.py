"""A step's plan on the wire: made once by rank 0's scheduler, broadcast, and run by every rank.

A plan is one int64 tensor: the number of rows, then per row
``[request id, start, count, emits, number of blocks, blocks..., tokens[start:start+count]...]``.
:func:`share_plan` sends its length, then its contents (two broadcasts, under the tag "schedule"); a length of 0
tells the ranks to stop. The static-batching baseline (:mod:`tplab.serving.static`) shares its batches' request
ids the same way.
"""
from __future__ import annotations

import torch

from tplab.comm.group import Dist
from tplab.serving.scheduler import StepPlan


def encode_plan(plan: StepPlan) -> list[int]:
    """The plan as ints (see the module docstring)."""
    out = [len(plan.rows)]
    for row in plan.rows:
        seq = row.seq
        out += [seq.id, row.start, row.count, int(row.emits), len(seq.block_ids), *seq.block_ids,
                *seq.tokens[row.start:row.start + row.count]]
    return out


def decode_plan(ints: list[int]) -> list[tuple[int, int, bool, list[int], list[int]]]:
    """The rows of :func:`encode_plan`'s ints: (request id, start, emits, block table, tokens fed)."""
    rows, i = [], 1
    for _ in range(ints[0]):
        rid, start, count, emits, blocks = ints[i:i + 5]
        table = ints[i + 5:i + 5 + blocks]
        rows.append((rid, start, bool(emits), table, ints[i + 5 + blocks:i + 5 + blocks + count]))
        i += 5 + blocks + count
    return rows


def share_plan(dist: Dist, ints: list[int] | None) -> list[int]:
    """Rank 0's plan on every rank: its length, then its contents (two broadcasts, tag "schedule")."""
    stats, tag = dist.stats, dist.stats.tag
    stats.tag = "schedule"
    try:
        length = dist.broadcast(torch.tensor([0 if ints is None else len(ints)], dtype=torch.long), src=0)
        if int(length[0]) == 0:
            return []
        payload = torch.tensor(ints, dtype=torch.long) if ints is not None else torch.zeros(int(length[0]),
                                                                                            dtype=torch.long)
        return dist.broadcast(payload, src=0).tolist()
    finally:
        stats.tag = tag
