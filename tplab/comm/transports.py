"""Transports: how the ranks' tensors actually move, behind :class:`tplab.comm.Dist`.

* :class:`ThreadTransport`: ranks are threads of one process (notebooks).
  Reductions add the ranks' tensors in rank order 0, 1, ..., n-1, so results
  are deterministic and identical on every rank.
* :class:`TorchTransport`: a ``torch.distributed`` process group, the default one or a sub-group of the grid
  (gloo processes on CPU, NCCL under torchrun on GPUs).

A transport has the collectives of :class:`~tplab.comm.Dist` without the
bookkeeping: ``all_reduce(t)``, ``all_gather(t, dim)``, ``reduce_scatter(t,
dim)``, ``broadcast(t, src)``, ``all_to_all(chunks)``, ``send(t, dst)``,
``recv(buffer, src)``, ``barrier()``; ranks are numbered within the group.
"""
from __future__ import annotations

import queue
import threading
import time

import torch

from tplab.comm.group import CollectiveTimeout, PeerFailure


class SoloTransport:
    """A group of one rank: :class:`~tplab.comm.Dist` answers its collectives by their definition for n = 1, and
    there is no peer to send to or wait for."""

    def send(self, t, dst):
        raise ValueError(f"send to rank {dst} in a group of one rank: there is no peer")

    def recv(self, buffer, src):
        raise ValueError(f"recv from rank {src} in a group of one rank: there is no peer")

    def barrier(self):
        pass


# --- threads: ranks inside one process ---------------------------------------
class ThreadGroup:
    """Shared state of a group of thread ranks: a barrier, one slot per rank, mailboxes.

    The barrier counts generations: a rank is through as soon as every rank has
    arrived in its generation, whatever happens afterwards. A rank that fails
    (:meth:`abort`) or returns (:meth:`rank_returned`) wakes the ranks waiting
    for it, so they raise at once instead of waiting out the timeout.
    """

    def __init__(self, world_size: int, timeout: float) -> None:
        self.world_size = world_size
        self.timeout = timeout
        self._cond = threading.Condition()
        self._arrived: set[int] = set()
        self._generation = 0
        self._slots: list[object] = [None] * world_size
        self._mailboxes: dict[tuple[int, int], queue.Queue] = {}  # (src, dst) -> messages, made on first use
        self._aborted = False
        self._returned: list[int] = []

    def abort(self) -> None:
        """Wake every rank blocked in a collective; they raise :class:`PeerFailure`."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def rank_returned(self, rank: int) -> None:
        """Rank's program has returned, so no later collective can complete: wake whoever waits for one."""
        with self._cond:
            self._returned.append(rank)
            self._cond.notify_all()

    def _broken(self) -> Exception | None:
        """Why no collective can complete any more, or None."""
        if self._aborted:
            return PeerFailure("collective aborted: another rank failed (its error is re-raised by launch)")
        if self._returned:
            return CollectiveTimeout(f"rank(s) {sorted(self._returned)} returned without joining this collective: "
                                     "every rank must call the same collectives in the same order")
        return None

    def _wait(self, rank: int) -> None:
        with self._cond:
            if error := self._broken():
                raise error
            generation = self._generation
            self._arrived.add(rank)
            if len(self._arrived) == self.world_size:
                self._arrived, self._generation = set(), generation + 1
                self._cond.notify_all()
                return
            deadline = time.monotonic() + self.timeout
            while self._generation == generation:
                if error := self._broken():
                    raise error
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._aborted = True  # the group is now inconsistent: stop the others too
                    self._cond.notify_all()
                    missing = sorted(set(range(self.world_size)) - self._arrived)
                    raise CollectiveTimeout(f"rank {rank} waited more than {self.timeout:g} s in a collective for "
                                            f"rank(s) {missing}, which never joined it")
                self._cond.wait(remaining)

    def exchange(self, rank: int, value: object) -> list[object]:
        """Every rank contributes ``value``; every rank gets all of them in rank order."""
        self._slots[rank] = value
        self._wait(rank)
        values = list(self._slots)
        self._wait(rank)  # nobody overwrites a slot before everyone has read it
        return values

    def _mailbox(self, src: int, dst: int) -> queue.Queue:
        with self._cond:
            return self._mailboxes.setdefault((src, dst), queue.Queue())

    def post(self, src: int, dst: int, t: torch.Tensor) -> None:
        self._mailbox(src, dst).put(t.detach().clone())

    def take(self, src: int, dst: int) -> torch.Tensor:
        deadline = time.monotonic() + self.timeout
        box = self._mailbox(src, dst)
        while True:
            if self._aborted or (src in self._returned and box.empty()):
                raise self._broken()
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

    def all_to_all(self, chunks):
        sent = self.group.exchange(self.rank, chunks)
        return [sent[j][self.rank].clone() for j in range(self.group.world_size)]

    def send(self, t, dst):
        self.group.post(self.rank, dst, t)

    def recv(self, buffer, src):
        buffer.copy_(self.group.take(src, self.rank))
        return buffer

    def barrier(self):
        self.group.exchange(self.rank, None)


# --- torch.distributed: gloo processes, or NCCL under torchrun ----------------
class _PeerFailureOnError:
    """Wraps torch.distributed so that errors in its calls become PeerFailure (or CollectiveTimeout)."""

    def __init__(self, td) -> None:
        self._td = td

    def __getattr__(self, name: str):
        call = getattr(self._td, name)

        def guarded(*args, **kwargs):
            try:
                return call(*args, **kwargs)
            except RuntimeError as e:
                if "timed out" in str(e).lower():
                    raise CollectiveTimeout(f"torch.distributed.{name} timed out waiting for a peer: {e}") from e
                raise PeerFailure(f"torch.distributed.{name} failed, most likely because a peer rank "
                                  f"failed or left: {e}") from e
        return guarded


class TorchTransport:
    """Collectives of a torch.distributed process group: ``group`` (None: the default one) of global ranks ``members``.

    A RuntimeError inside a torch.distributed call (a peer that died or hung
    up) is re-raised as :class:`PeerFailure`, so ``launch`` reports the cause,
    not the peers' reaction to it; a gloo timeout becomes :class:`CollectiveTimeout`.

    On gloo, reduce-scatter runs as an all-reduce of a copy followed by a local
    chunk (same result, twice the traffic); NCCL runs the real one.
    """

    def __init__(self, group=None, members: list[int] | None = None) -> None:
        import torch.distributed as td
        self.td = _PeerFailureOnError(td)
        self.group = group
        self.members = list(range(td.get_world_size())) if members is None else list(members)
        self.world_size = len(self.members)
        self.rank = self.members.index(td.get_rank())
        self.native_reduce_scatter = td.get_backend() == "nccl"
        self._sends: list = []  # (work, tensor) of the sends posted and not known to have left

    def all_reduce(self, t):
        self.td.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t, dim):
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self.td.all_gather(parts, t, group=self.group)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, t, dim):
        if not self.native_reduce_scatter:
            t = t.clone()  # all_reduce works in place; the caller's tensor stays as it was
            self.td.all_reduce(t, group=self.group)
            return t.chunk(self.world_size, dim=dim)[self.rank].contiguous()
        chunks = [c.contiguous() for c in t.chunk(self.world_size, dim=dim)]
        out = torch.empty_like(chunks[0])
        self.td.reduce_scatter(out, chunks, group=self.group)
        return out

    def broadcast(self, t, src):
        self.td.broadcast(t, self.members[src], group=self.group)
        return t

    def all_to_all(self, chunks):
        """The sizes first (one int64 per peer), then the data in one ``all_to_all_single`` of uneven splits."""
        device = chunks[0].device
        send_sizes = torch.tensor([c.shape[0] for c in chunks], dtype=torch.int64, device=device)
        recv_sizes = torch.empty_like(send_sizes)
        self.td.all_to_all_single(recv_sizes, send_sizes, group=self.group)
        recv_sizes = recv_sizes.tolist()
        out = torch.empty((sum(recv_sizes), *chunks[0].shape[1:]), dtype=chunks[0].dtype, device=device)
        self.td.all_to_all_single(out, torch.cat([c.contiguous() for c in chunks]), recv_sizes,
                                  send_sizes.tolist(), group=self.group)
        return list(out.split(recv_sizes))

    def send(self, t, dst):
        """Posted, not waited for (``isend``): a stage hands its step on and goes on with the next, as the thread
        mailboxes do; gloo's blocking send would wait for the receiver, and two stages that send to each other
        (activations forward, tokens back) would wait for ever. The tensor is kept until its message has left."""
        t = t.contiguous()
        self._sends = [(work, x) for work, x in self._sends if not work.is_completed()]
        self._sends.append((self.td.isend(t, self.members[dst], group=self.group), t))

    def wait_sends(self) -> None:
        """Wait until every posted send has left (before the process group goes away)."""
        for work, _ in self._sends:
            work.wait()
        self._sends = []

    def recv(self, buffer, src):
        self.td.recv(buffer, self.members[src], group=self.group)
        return buffer

    def barrier(self):
        self.td.barrier(group=self.group)
