"""Collectives through shared memory, for process ranks on one host: no sockets, a fixed rank order.

gloo moves every all-reduce through loopback TCP: for the small messages of a
decode step (a few KB), the system calls and wake-ups cost more than the data.
Ranks on one host can instead share one memory segment and exchange through
it. The segment (``/dev/shm/<name>``) holds a header and two buffers of one
slot per rank:

    header: posted[0..n-1] (int64), pid[0..n-1] (int64), abort (int64)
    buffer b in {0, 1}: slot[b][0], ..., slot[b][n-1], ``slot_bytes`` each

Collective number g (every rank counts its own, and all ranks issue the same
collectives in the same order) runs:

1. write this rank's tensor into slot[g mod 2][rank];
2. post: posted[rank] = g (on x86-64 the data is stored before the counter, and seen in that order);
3. wait until every posted[r] >= g;
4. read: sum the slots in rank order 0, 1, ..., n-1 (all-reduce, reduce-scatter), concatenate them
   (all-gather), or take slot[src] (broadcast). Every rank computes the same sum, bit for bit.

No second wait is needed before the next collective: g + 1 writes the buffer
of g - 1, which every rank finished reading before it posted g, and this rank
saw them all post g. A wait that outlasts the timeout raises
:class:`~tplab.comm.group.CollectiveTimeout` naming the ranks that never posted;
a peer whose process is gone, or that raised (it sets ``abort``), makes the
waiting ranks raise :class:`~tplab.comm.group.PeerFailure` at once.

The name is removed as soon as every rank has mapped the segment (the memory
lives on until the last rank unmaps it), and the launcher removes it again
after the ranks end, so nothing is left in /dev/shm, killed ranks included.
Messages larger than a slot, and all-to-all, send, recv and barrier, go through gloo.
"""
from __future__ import annotations

import mmap
import os
import platform
import time
from pathlib import Path

import torch

from tplab.comm.group import CollectiveTimeout, PeerFailure
from tplab.errors import InputError

SHM_DIR = Path("/dev/shm")
SLOT_BYTES = int(os.environ.get("TPLAB_SHM_SLOT_BYTES", 1 << 20))  # per rank and buffer: 1 MiB
ALIGN = 64
HOT_SPINS = 4096  # polls (about 1 ms) before a waiting rank yields its core, when every rank has a core of its own
LIVENESS_S = 0.02  # how often a waiting rank checks that the ranks it waits for still exist


def available() -> bool:
    """Shared memory is used on Linux x86-64 (its store order is what step 2 relies on), where /dev/shm exists."""
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64") and SHM_DIR.is_dir()


def segment_bytes(world_size: int, slot_bytes: int = SLOT_BYTES) -> int:
    return _header_bytes(world_size) + 2 * world_size * slot_bytes


def _header_bytes(world_size: int) -> int:
    return -(-8 * (2 * world_size + 1) // ALIGN) * ALIGN


def clash(path: Path) -> InputError:
    """The one-line error for a segment name that exists already: never opened, never removed (not ours)."""
    return InputError(f"{path} already exists, though its name was drawn at random for this launch: another program "
                      "holds or planted it; the launch was stopped and the file left alone: run it again (a new "
                      "name is drawn)")


def remove(name: str) -> None:
    """Remove the segment's name if it is still there (the launcher calls this after the ranks end)."""
    try:
        (SHM_DIR / name).unlink()
    except FileNotFoundError:
        pass


class SharedMemoryTransport:
    """all_reduce, all_gather, reduce_scatter and broadcast through one shared segment; the rest through ``fallback``.

    Build it with :meth:`open` on every rank, after the gloo group exists (it is used to agree that the segment is
    ready, and as the fallback).
    """

    def __init__(self, mm: mmap.mmap, rank: int, world_size: int, fallback, timeout: float,
                 slot_bytes: int = SLOT_BYTES) -> None:
        self.mm, self.rank, self.world_size, self.fallback = mm, rank, world_size, fallback
        self.timeout, self.slot_bytes, self.count = timeout, slot_bytes, 0
        # more ranks than cores: a spinning rank would take the core a peer needs to reach the collective
        self.hot_spins = HOT_SPINS if world_size <= (os.cpu_count() or 1) else 1
        self.header = memoryview(mm).cast("B")[:8 * (2 * world_size + 1)].cast("q")
        base = _header_bytes(world_size)
        self.slots = [[torch.frombuffer(mm, dtype=torch.uint8, count=slot_bytes,
                                        offset=base + (b * world_size + r) * slot_bytes) for r in range(world_size)]
                      for b in (0, 1)]

    @classmethod
    def open(cls, name: str, rank: int, world_size: int, fallback, timeout: float,
             slot_bytes: int = SLOT_BYTES) -> "SharedMemoryTransport":
        """Rank 0 creates ``/dev/shm/name``; the others map it; then the name is removed (see the module docstring)."""
        path, size = SHM_DIR / name, segment_bytes(world_size, slot_bytes)
        if rank == 0:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            except FileExistsError:
                raise clash(path) from None
            os.ftruncate(fd, size)
        fallback.barrier()
        if rank != 0:
            fd = os.open(path, os.O_RDWR)
        try:
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        transport = cls(mm, rank, world_size, fallback, timeout, slot_bytes)
        transport.header[world_size + rank] = os.getpid()
        fallback.barrier()
        if rank == 0:
            remove(name)
        return transport

    def __repr__(self) -> str:
        return f"SharedMemoryTransport(rank={self.rank}, world_size={self.world_size}, slot_bytes={self.slot_bytes})"

    # --- the protocol ----------------------------------------------------
    def abort(self) -> None:
        """Tell the peers that this rank failed: their waits raise PeerFailure now, not at the timeout."""
        self.header[2 * self.world_size] = 1

    def close(self) -> None:
        """Unmap the segment (its memory is freed when the last rank has unmapped it)."""
        self.slots = []
        self.header.release()
        try:
            self.mm.close()
        except BufferError:  # a tensor still views the segment: the mapping goes with the process
            pass

    def _view(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        """Rank ``rank``'s slot of the current collective, as a tensor shaped like ``t``."""
        nbytes = t.numel() * t.element_size()
        return self.slots[self.count % 2][rank][:nbytes].view(t.dtype).view(t.shape)

    def _fits(self, t: torch.Tensor) -> bool:
        return t.numel() * t.element_size() <= self.slot_bytes

    def _exchange(self, t: torch.Tensor | None) -> None:
        """Steps 1-3: write ``t`` (None: nothing, e.g. a broadcast's receivers), post, wait for every rank."""
        self.count += 1
        if t is not None:
            self._view(self.rank, t).copy_(t)
        self.header[self.rank] = self.count
        n, spins = self.world_size, 0
        deadline, check_at = time.monotonic() + self.timeout, time.monotonic() + LIVENESS_S
        while min(self.header[:n]) < self.count:
            spins += 1
            if spins < self.hot_spins:
                continue
            time.sleep(0)
            now = time.monotonic()
            if now >= check_at:
                self._check_peers(now > deadline)
                check_at = now + LIVENESS_S

    def _check_peers(self, timed_out: bool) -> None:
        n = self.world_size
        missing = [r for r in range(n) if self.header[r] < self.count]
        if self.header[2 * n]:
            raise PeerFailure("collective aborted: another rank failed (its error is re-raised by launch)")
        for r in missing:
            try:
                os.kill(self.header[n + r], 0)
            except ProcessLookupError:
                raise PeerFailure(f"rank {r} (pid {self.header[n + r]}) is gone: its process ended during a "
                                  "shared-memory collective") from None
        if timed_out:
            self.abort()
            raise CollectiveTimeout(f"rank {self.rank} waited more than {self.timeout:g} s in a shared-memory "
                                    f"collective for rank(s) {missing}, which never joined it")

    def _sum(self, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out.copy_(self._view(0, t))
        for r in range(1, self.world_size):
            out += self._view(r, t)
        return out

    # --- the collectives ---------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if not self._fits(t):
            return self.fallback.all_reduce(t)
        self._exchange(t)
        return self._sum(t, t)

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        if not self._fits(t):
            return self.fallback.all_gather(t, dim)
        self._exchange(t)
        return torch.cat([self._view(r, t) for r in range(self.world_size)], dim=dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        if not self._fits(t):
            return self.fallback.reduce_scatter(t, dim)
        self._exchange(t)
        total = self._sum(t, torch.empty_like(t))
        return total.chunk(self.world_size, dim=dim)[self.rank].contiguous()

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        if not self._fits(t):
            return self.fallback.broadcast(t, src)
        self._exchange(t if self.rank == src else None)
        if self.rank != src:
            t.copy_(self._view(src, t))
        return t

    def all_to_all(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.fallback.all_to_all(chunks)

    def send(self, t: torch.Tensor, dst: int) -> None:
        self.fallback.send(t, dst)

    def recv(self, buffer: torch.Tensor, src: int) -> torch.Tensor:
        return self.fallback.recv(buffer, src)

    def barrier(self) -> None:
        self.fallback.barrier()
