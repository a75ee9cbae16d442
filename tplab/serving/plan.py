"""A step's plan on the wire: made once by rank 0's scheduler, broadcast, and run by every rank.

A plan is one int64 tensor: the number of rows, then per row
``[request id, start, count, emits, number of blocks, blocks..., tokens[start:start+count]...]``.
:func:`share_plan` sends its length, then its contents (two broadcasts, under the tag "schedule"); a length of 0
tells the ranks to stop. With pipeline stages, each stage hands the plan on to the next
(:func:`pass_plan`, :func:`receive_plan`: two sends of the pipeline group, the same length-then-contents). The static-batching baseline (:mod:`tplab.serving.static`) shares its batches' request
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
    def broadcast():
        length = dist.broadcast(torch.tensor([0 if ints is None else len(ints)], dtype=torch.long), src=0)
        if int(length[0]) == 0:
            return []
        payload = torch.tensor(ints, dtype=torch.long) if ints is not None else torch.zeros(int(length[0]),
                                                                                            dtype=torch.long)
        return dist.broadcast(payload, src=0).tolist()
    return _tagged(dist, broadcast)


def _tagged(dist: Dist, call):
    stats, tag = dist.stats, dist.stats.tag
    stats.tag = "schedule"
    try:
        return call()
    finally:
        stats.tag = tag


def pass_plan(pipe: Dist, ints: list[int]) -> None:
    """Hand a plan (``[]``: stop) to the next stage of the pipeline group ``pipe``: its length, then its contents."""
    def send():
        pipe.send(torch.tensor([len(ints)], dtype=torch.long), pipe.rank + 1)
        if ints:
            pipe.send(torch.tensor(ints, dtype=torch.long), pipe.rank + 1)
    _tagged(pipe, send)


def receive_plan(pipe: Dist) -> list[int]:
    """The plan the stage before handed on (``[]``: stop)."""
    def recv():
        length = int(pipe.recv(torch.zeros(1, dtype=torch.long), pipe.rank - 1)[0])
        return pipe.recv(torch.zeros(length, dtype=torch.long), pipe.rank - 1).tolist() if length else []
    return _tagged(pipe, recv)


def send_tokens(pipe: Dist, tokens: dict[int, int]) -> None:
    """The token return: the last stage's chosen ids (in the plan's order of emitting rows) to the first stage;
    nothing when no row emitted."""
    if tokens:
        pipe.send(torch.tensor(list(tokens.values()), dtype=torch.long), 0)


def receive_tokens(pipe: Dist, ids: list[int]) -> dict[int, int]:
    """{request id: token} for the emitting rows ``ids`` of a plan, from the last stage's :func:`send_tokens`."""
    if not ids:
        return {}
    return dict(zip(ids, pipe.recv(torch.zeros(len(ids), dtype=torch.long), pipe.world_size - 1).tolist()))
