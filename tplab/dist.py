"""Dist: one rank's view of its tensor-parallel group.

Every TP function in tplab is an SPMD *rank program* ``fn(dist, ...)``: the same
code runs on every rank, and ``dist`` tells it who it is (``rank``), how many
ranks there are (``world_size``), where its tensors live (``device``), and how
to talk to the others (the collectives below).

All communication goes through :class:`Dist`, which times each call and records
it in ``dist.stats`` (a :class:`~tplab.comm_stats.CommStats`). The actual data
movement is delegated to a *transport*:

* :class:`ThreadTransport`: ranks are threads of one process (notebooks).
  Reductions add the ranks' tensors in rank order 0, 1, ..., n-1, so results
  are deterministic and identical on every rank.
* :class:`TorchTransport`: ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Collective semantics (x_r is rank r's input, n = world_size):

* ``all_reduce(x)``      -> x_0 + x_1 + ... + x_{n-1}               (every rank)
* ``all_gather(x, dim)`` -> cat([x_0, ..., x_{n-1}], dim)              (every rank)
* ``reduce_scatter(x, dim)`` -> chunk r of (x_0 + ... + x_{n-1}) along dim (rank r)
* ``broadcast(x, src)``  -> x_src                                       (every rank)

``all_reduce`` and ``broadcast`` may write their result into ``x`` (as
torch.distributed does): do not rely on ``x`` keeping its old value.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import torch

from tplab.comm_stats import CommStats


class PeerFailure(RuntimeError):
    """Raised on a rank whose collective was cut short because a peer failed."""


class CollectiveTimeout(TimeoutError):
    """Raised on a rank that waited longer than the group's timeout for its peers."""


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Dist:
    """One rank's handle on the group: identity, device, collectives, stats.

    ``time_collectives``: on CUDA, timing a collective needs a device
    synchronize before and after it. Turn it off to keep the stream free;
    counts and bytes are still recorded, with ``seconds = 0``.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, transport,
                 time_collectives: bool = True) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.stats = CommStats()
        self.time_collectives = time_collectives
        self._transport = transport

    def __repr__(self) -> str:
        return f"Dist(rank={self.rank}, world_size={self.world_size}, device={self.device}, transport={type(self._transport).__name__})"

    def _timed(self, op: str, t: torch.Tensor, nbytes: int, call: Callable[[], torch.Tensor | None]):
        sync = self.time_collectives and self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out = call()
        if sync:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start if self.time_collectives else 0.0
        self.stats.record(op, tuple(t.shape), str(t.dtype).removeprefix("torch."), nbytes, seconds)
        return out

    # --- collectives -----------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's ``t``, returned on every rank."""
        return self._timed("all_reduce", t, _nbytes(t), lambda: self._transport.all_reduce(t))

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``t`` (all the same shape) concatenated along ``dim`` in rank order."""
        return self._timed("all_gather", t, _nbytes(t) * self.world_size,
                           lambda: self._transport.all_gather(t, dim))

    def reduce_scatter(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Rank r's chunk (of n equal chunks along ``dim``) of the sum of every rank's ``t``."""
        if t.shape[dim] % self.world_size:
            raise ValueError(
                f"reduce_scatter: size {t.shape[dim]} of dim {dim} is not divisible by world_size={self.world_size}")
        return self._timed("reduce_scatter", t, _nbytes(t),
                           lambda: self._transport.reduce_scatter(t, dim))

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``t`` on every rank (the others pass a tensor of the same shape)."""
        return self._timed("broadcast", t, _nbytes(t), lambda: self._transport.broadcast(t, src))

    def send(self, t: torch.Tensor, dst: int) -> None:
        """Point-to-point: give ``t`` to rank ``dst`` (which must call ``recv``)."""
        self._timed("send", t, _nbytes(t), lambda: self._transport.send(t, dst))

    def recv(self, buffer: torch.Tensor, src: int) -> torch.Tensor:
        """Point-to-point: fill ``buffer`` with what rank ``src`` sent; returns it."""
        return self._timed("recv", buffer, _nbytes(buffer), lambda: self._transport.recv(buffer, src))

    def barrier(self) -> None:
        """Wait until every rank has reached this point (not recorded: it moves no data)."""
        self._transport.barrier()


# --- threads: ranks inside one process ---------------------------------------
class ThreadGroup:
    """Shared state of a group of thread ranks: a barrier, one slot per rank, mailboxes."""

    def __init__(self, world_size: int, timeout: float) -> None:
        self.world_size = world_size
        self.timeout = timeout
        self._barrier = threading.Barrier(world_size, timeout=timeout)
        self._slots: list[object] = [None] * world_size
        self._mailboxes = {(s, d): queue.Queue() for s in range(world_size) for d in range(world_size)}
        self._aborted = threading.Event()

    def abort(self) -> None:
        """Wake every rank blocked in a collective; they raise :class:`PeerFailure`."""
        self._aborted.set()
        self._barrier.abort()

    def _raise_broken(self):
        if self._aborted.is_set():
            raise PeerFailure("collective aborted: another rank failed (its error is re-raised by launch)")
        raise CollectiveTimeout(f"waited more than {self.timeout:g} s for the other ranks")

    def _wait(self) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            self._raise_broken()

    def exchange(self, rank: int, value: object) -> list[object]:
        """Every rank contributes ``value``; every rank gets all of them in rank order."""
        self._slots[rank] = value
        self._wait()
        values = list(self._slots)
        self._wait()  # nobody overwrites a slot before everyone has read it
        return values

    def post(self, src: int, dst: int, t: torch.Tensor) -> None:
        self._mailboxes[(src, dst)].put(t.detach().clone())

    def take(self, src: int, dst: int) -> torch.Tensor:
        deadline = time.monotonic() + self.timeout
        box = self._mailboxes[(src, dst)]
        while True:
            if self._aborted.is_set():
                self._raise_broken()
            try:
                return box.get(timeout=0.02)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise CollectiveTimeout(f"rank {dst} waited more than {self.timeout:g} s for a message from rank {src}")


class ThreadTransport:
    """Collectives between thread ranks, reducing in fixed rank order."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group = group
        self.rank = rank

    def _all(self, t: torch.Tensor) -> list[torch.Tensor]:
        tensors = self.group.exchange(self.rank, t)
        if any(x.shape != t.shape or x.dtype != t.dtype for x in tensors):
            shapes = [(tuple(x.shape), str(x.dtype)) for x in tensors]
            raise ValueError(f"ranks passed tensors of different shapes or dtypes: {shapes}")
        return tensors

    @staticmethod
    def _sum_in_rank_order(tensors: list[torch.Tensor]) -> torch.Tensor:
        total = tensors[0].clone()
        for x in tensors[1:]:
            total += x
        return total

    def all_reduce(self, t):
        return self._sum_in_rank_order(self._all(t))

    def all_gather(self, t, dim):
        return torch.cat(self._all(t), dim=dim)

    def reduce_scatter(self, t, dim):
        total = self._sum_in_rank_order(self._all(t))
        return total.chunk(self.group.world_size, dim=dim)[self.rank].contiguous()

    def broadcast(self, t, src):
        return self._all(t)[src].clone()

    def send(self, t, dst):
        self.group.post(self.rank, dst, t)

    def recv(self, buffer, src):
        buffer.copy_(self.group.take(src, self.rank))
        return buffer

    def barrier(self):
        self.group.exchange(self.rank, None)


# --- torch.distributed: gloo processes, or NCCL under torchrun ----------------
class _PeerFailureOnError:
    """Wraps torch.distributed so that errors in its calls become PeerFailure."""

    def __init__(self, td) -> None:
        self._td = td

    def __getattr__(self, name: str):
        call = getattr(self._td, name)

        def guarded(*args, **kwargs):
            try:
                return call(*args, **kwargs)
            except RuntimeError as e:
                raise PeerFailure(f"torch.distributed.{name} failed, most likely because a peer rank "
                                  f"failed or left: {e}") from e
        return guarded


class TorchTransport:
    """Collectives of the default torch.distributed process group.

    A RuntimeError inside a torch.distributed call (a peer that died or hung
    up) is re-raised as :class:`PeerFailure`, so ``launch`` reports the cause,
    not the peers' reaction to it.

    gloo has no reduce-scatter: there it runs as an all-reduce followed by a
    local chunk (same result, twice the traffic); NCCL runs the real one.
    """

    def __init__(self) -> None:
        import torch.distributed as td
        self.td = _PeerFailureOnError(td)
        self.world_size = td.get_world_size()
        self.rank = td.get_rank()
        self.native_reduce_scatter = td.get_backend() == "nccl"

    def all_reduce(self, t):
        self.td.all_reduce(t)
        return t

    def all_gather(self, t, dim):
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self.td.all_gather(parts, t)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, t, dim):
        if not self.native_reduce_scatter:
            self.td.all_reduce(t)
            return t.chunk(self.world_size, dim=dim)[self.rank].contiguous()
        chunks = [c.contiguous() for c in t.chunk(self.world_size, dim=dim)]
        out = torch.empty_like(chunks[0])
        self.td.reduce_scatter(out, chunks)
        return out

    def broadcast(self, t, src):
        self.td.broadcast(t, src)
        return t

    def send(self, t, dst):
        self.td.send(t.contiguous(), dst)

    def recv(self, buffer, src):
        self.td.recv(buffer, src)
        return buffer

    def barrier(self):
        self.td.barrier()
