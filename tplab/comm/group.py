"""Dist: one rank's view of one of its groups (tensor-parallel, pipeline or expert).

Every TP function in tplab is an SPMD *rank program* ``fn(dist, ...)``: the same
code runs on every rank, and ``dist`` tells it who it is (``rank``), how many
ranks there are (``world_size``), where its tensors live (``device``), and how
to talk to the others (the collectives below).

All communication goes through :class:`Dist`, which times each call and records
it in ``dist.stats`` (a :class:`~tplab.comm.stats.CommStats`). The actual data
movement is delegated to a *transport* (:mod:`tplab.comm.transports`): threads of
one process, or ``torch.distributed`` (gloo on CPU, NCCL on GPU); and
:mod:`tplab.bench.emulation` has one that moves no data at all.

Collective semantics (x_r is rank r's input, n = world_size):

* ``all_reduce(x)``      -> x_0 + x_1 + ... + x_{n-1}               (every rank)
* ``all_gather(x, dim)`` -> cat([x_0, ..., x_{n-1}], dim)              (every rank)
* ``reduce_scatter(x, dim)`` -> chunk r of (x_0 + ... + x_{n-1}) along dim (rank r)
* ``broadcast(x, src)``  -> x_src                                       (every rank)
* ``all_to_all([c_0, ..., c_{n-1}])`` -> [c_0 of rank 0, ..., c_{n-1}'s counterpart]: rank r receives, from
  every rank j, the chunk j addressed to it: out_r[j] = chunks_j[r]. Chunks may differ in their first
  dimension (uneven splits, as when tokens go to the ranks of their experts).

Ranks are numbered within the group (0 .. n-1); ``send``, ``recv`` and
``broadcast`` name peers by that number. A rank program receives the Dist of
its tensor-parallel group, and ``dist.grid`` (:class:`~tplab.comm.grid.Grid`)
names its other groups.

``all_reduce`` and ``broadcast`` may write their result into ``x`` (as
torch.distributed does): do not rely on ``x`` keeping its old value.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from tplab.comm.compiled import register
from tplab.comm.stats import CommStats


class PeerFailure(RuntimeError):
    """Raised on a rank whose collective was cut short because a peer failed."""


class CollectiveTimeout(TimeoutError):
    """Raised on a rank whose collective cannot complete: a peer did not join it within
    the group's timeout (still busy elsewhere), or had already returned without joining it."""


def first_error(errors: dict[int, BaseException]) -> tuple[int, BaseException]:
    """The error that caused the failure: the first (in arrival order) that is not a peer's reaction."""
    for rank, err in errors.items():
        if not isinstance(err, PeerFailure):
            return rank, err
    return next(iter(errors.items()))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Dist:
    """One rank's handle on the group: identity, device, collectives, stats.

    ``time_collectives``: on CUDA, timing a collective needs a device
    synchronize before and after it. Turn it off to keep the stream free;
    counts and bytes are still recorded, with ``seconds = 0``.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, transport,
                 time_collectives: bool = True, group: str = "tp") -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.group = group
        self.stats = CommStats(group=group)
        self.time_collectives = time_collectives
        self.grid = None  # set by launch: the rank's place in the tp x pp grid and its other groups
        self.watch = None  # set by launch: a RankWatch that the launcher reads (tplab.comm.stats)
        self._transport = transport
        self.compiled_key = register(self)  # how a compiled graph's all-reduce finds this group

    def __repr__(self) -> str:
        return (f"Dist(group={self.group!r}, rank={self.rank}, world_size={self.world_size}, device={self.device}, "
                f"transport={type(self._transport).__name__})")

    def _timed(self, op: str, t: torch.Tensor, nbytes: int, call: Callable[[], object],
               shape: tuple[int, ...] | None = None):
        sync = self.time_collectives and self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        if self.watch is not None:
            self.watch.enter(op, self.group)
        start = time.perf_counter()
        out = call()
        if self.watch is not None:
            self.watch.leave()
        if sync:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start if self.time_collectives else 0.0
        shape = tuple(t.shape) if shape is None else shape
        self.stats.record(op, shape, str(t.dtype).removeprefix("torch."), nbytes, seconds, start)
        return out

    # --- collectives -----------------------------------------------------
    # A group of one rank moves no data: each collective is its definition for n = 1 (still recorded and counted).
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's ``t``, returned on every rank. Inside torch.compile, one opaque operator that runs
        this same call when the compiled code runs (:mod:`tplab.comm.compiled`)."""
        if torch.compiler.is_compiling():
            return torch.ops.tplab.all_reduce(t, self.compiled_key)
        return self.eager_all_reduce(t)

    def eager_all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The all-reduce itself, timed and recorded (what the compiled graph's operator runs)."""
        return self._timed("all_reduce", t, _nbytes(t),
                           lambda: t if self.world_size == 1 else self._transport.all_reduce(t))

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``t`` (all the same shape) concatenated along ``dim`` in rank order."""
        return self._timed("all_gather", t, _nbytes(t) * self.world_size,
                           lambda: t.clone() if self.world_size == 1 else self._transport.all_gather(t, dim))

    def reduce_scatter(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Rank r's chunk (of n equal chunks along ``dim``) of the sum of every rank's ``t``."""
        if t.shape[dim] % self.world_size:
            raise ValueError(
                f"reduce_scatter: size {t.shape[dim]} of dim {dim} is not divisible by world_size={self.world_size}")
        return self._timed("reduce_scatter", t, _nbytes(t),
                           lambda: t.clone() if self.world_size == 1 else self._transport.reduce_scatter(t, dim))

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``t`` on every rank (the others pass a tensor of the same shape)."""
        return self._timed("broadcast", t, _nbytes(t),
                           lambda: t if self.world_size == 1 else self._transport.broadcast(t, src))

    def all_to_all(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Chunk j to rank j; returns what every rank addressed to this one, in rank order (out[j] from rank j).

        The chunks may differ in their first dimension, not in the others or in dtype; a rank learns the
        sizes it receives from the call itself.
        """
        if len(chunks) != self.world_size:
            raise ValueError(f"all_to_all takes one chunk per rank: {len(chunks)} chunks for world_size="
                             f"{self.world_size}")
        first = chunks[0]
        if any(c.dtype != first.dtype or c.shape[1:] != first.shape[1:] for c in chunks):
            raise ValueError("all_to_all: chunks may differ in their first dimension only, got "
                             f"{[(tuple(c.shape), str(c.dtype)) for c in chunks]}")
        shape = (sum(c.shape[0] for c in chunks), *first.shape[1:])
        return self._timed("all_to_all", first, sum(_nbytes(c) for c in chunks),
                           lambda: [chunks[0].clone()] if self.world_size == 1 else self._transport.all_to_all(chunks),
                           shape=shape)

    def send(self, t: torch.Tensor, dst: int) -> None:
        """Point-to-point: give ``t`` to rank ``dst`` (which must call ``recv``)."""
        self._timed("send", t, _nbytes(t), lambda: self._transport.send(t, dst))

    def recv(self, buffer: torch.Tensor, src: int) -> torch.Tensor:
        """Point-to-point: fill ``buffer`` with what rank ``src`` sent; returns it."""
        return self._timed("recv", buffer, _nbytes(buffer), lambda: self._transport.recv(buffer, src))

    def barrier(self) -> None:
        """Wait until every rank has reached this point (not recorded: it moves no data)."""
        if self.watch is not None:
            self.watch.enter("barrier", self.group)
        self._transport.barrier()
        if self.watch is not None:
            self.watch.leave()
