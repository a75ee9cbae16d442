"""Teaching collectives: all-reduce built from send/recv only.

Two algorithms, both computing y = x_0 + x_1 + ... + x_{n-1} on every rank:

* :func:`naive_all_reduce`: every rank sends its whole buffer to rank 0, which
  adds them in rank order and sends the sum back. Rank 0's link carries
  2(n-1) full buffers: it is the bottleneck.
* :func:`ring_all_reduce`: the buffer is cut into n chunks. In a reduce-scatter
  phase of n-1 steps, rank r sends one chunk to rank r+1 and adds the chunk it
  receives from rank r-1; afterwards rank r holds the complete sum of chunk
  (r+1) mod n. An all-gather phase of n-1 more steps passes the finished chunks
  around the ring. Every link carries 2(n-1)/n of the buffer, whatever n is.

:func:`ring_schedule` is the pure plan of who sends which chunk at each step;
the ring implementation follows it, and :func:`ring_contributions` replays it
on sets of rank ids so that notebooks can draw (and tests check) the progress. Costs: see
:mod:`tplab.perf.comm`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tplab.comm.group import Dist


@dataclass(frozen=True)
class RingTransfer:
    """At ``step`` of ``phase``, rank ``src`` sends chunk ``chunk`` to rank ``dst``."""

    phase: str  # "reduce_scatter" (receiver adds) or "all_gather" (receiver copies)
    step: int
    src: int
    dst: int
    chunk: int


def ring_schedule(n: int) -> list[list[RingTransfer]]:
    """The 2(n-1) steps of a ring all-reduce on n ranks, each a list of n transfers."""
    steps = []
    for phase, offset in (("reduce_scatter", 0), ("all_gather", 1)):
        for s in range(n - 1):
            steps.append([RingTransfer(phase, s, r, (r + 1) % n, (r + offset - s) % n) for r in range(n)])
    return steps


def ring_contributions(n: int) -> list[list[list[frozenset[int]]]]:
    """Whose data each chunk holds, before and after every step of the ring.

    ``history[t][r][c]`` is the set of ranks whose chunk c is summed into rank
    r's chunk c after t steps (t = 0 .. 2(n-1)). It starts as {r}; a
    reduce-scatter transfer adds the sender's set to the receiver's, an
    all-gather transfer replaces the receiver's set with the sender's.
    """
    state = [[frozenset({r})] * n for r in range(n)]
    history = [state]
    for step in ring_schedule(n):
        state = [row.copy() for row in state]
        for t in step:  # transfers of one step are simultaneous: read the previous state
            sent = history[-1][t.src][t.chunk]
            state[t.dst][t.chunk] = state[t.dst][t.chunk] | sent if t.phase == "reduce_scatter" else sent
        history.append(state)
    return history


def _exchange(dist: Dist, out: torch.Tensor, dst: int, into: torch.Tensor, src: int) -> torch.Tensor:
    """Send ``out`` to dst and receive ``into`` from src without deadlock.

    Blocking sends around a ring deadlock if every rank sends first, so even
    ranks send then receive and odd ranks receive then send.
    """
    if dist.rank % 2 == 0:
        dist.send(out, dst)
        return dist.recv(into, src)
    received = dist.recv(into, src)
    dist.send(out, dst)
    return received


def naive_all_reduce(dist: Dist, x: torch.Tensor) -> torch.Tensor:
    """Sum of every rank's x via rank 0: 2(n-1) point-to-point messages through one rank."""
    if dist.rank == 0:
        total = x.clone()
        for src in range(1, dist.world_size):
            total += dist.recv(torch.empty_like(x), src)
        for dst in range(1, dist.world_size):
            dist.send(total, dst)
        return total
    dist.send(x, 0)
    return dist.recv(torch.empty_like(x), 0)


def ring_all_reduce(dist: Dist, x: torch.Tensor) -> torch.Tensor:
    """Sum of every rank's x by reduce-scatter then all-gather around a ring.

    Works for any size: the flattened buffer is cut into n chunks whose sizes
    differ by at most one element.
    """
    n, rank = dist.world_size, dist.rank
    flat = x.detach().reshape(-1).clone()
    chunks = list(torch.tensor_split(flat, n))  # views into flat
    for step in ring_schedule(n):
        mine = step[rank]
        incoming = step[(rank - 1) % n]
        received = _exchange(dist, chunks[mine.chunk], mine.dst,
                             torch.empty_like(chunks[incoming.chunk]), incoming.src)
        if mine.phase == "reduce_scatter":
            chunks[incoming.chunk] += received
        else:
            chunks[incoming.chunk].copy_(received)
    return flat.reshape(x.shape)
