"""The instrumentation of collectives: what each rank ran (:class:`CommStats`), and where each rank is now
(:class:`LaunchProgress`).

Each call through :class:`tplab.comm.Dist` appends one :class:`CommRecord`
(op, shape, dtype, bytes, seconds, and when it started). Tests assert exact counts on it, notebooks
draw timelines from it, and the generation loop reports it per step.

Bytes follow the nccl-tests convention, so that bandwidth formulas apply
unchanged:

* ``all_reduce``, ``broadcast``, ``send``, ``recv``: the size of the tensor.
* ``all_gather``: the size of the gathered (full) output.
* ``reduce_scatter``: the size of the full input, before scattering.
* ``all_to_all``: the bytes this rank sends (the sum of its chunks, its own included).

With S bytes moved in t seconds on n ranks, algbw = S / t and the bus bandwidth
(what each link carries) is busbw = algbw * 2(n-1)/n for all-reduce and
algbw * (n-1)/n for all-gather and reduce-scatter.

Where each rank is, and since when: the launcher's bound on a launch that makes no progress.

Every :class:`~tplab.comm.Dist` of a rank reports to its :class:`RankWatch` as it enters and leaves a
collective, a send, a recv or a barrier; the rank reports when its program starts and when it returns. For each
rank the launcher then sees one state, (what, which group, when it began), in :class:`LaunchProgress`:

* a rank that is starting (a process joining the group) or inside a collective waits for its peers at most
  ``timeout`` seconds and then raises on its own (:class:`~tplab.comm.CollectiveTimeout`): the launcher leaves
  it to that;
* ranks that are all outside any collective (computing, or stuck) for ``timeout`` seconds since the last state
  change of any rank make no progress that the launcher could wait for: it stops them and names each one's
  state (:meth:`LaunchProgress.stalled`). A rank in a long computation that calls a collective now and then
  is making progress; a launch is bounded by ``timeout`` seconds *without* progress, not in total.

The states live in a flat array of 3 floats per rank (what, group, time.monotonic() of the change), a list for
thread ranks and a shared-memory array for processes (``time.monotonic`` is one clock for every process of a
Linux host).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import MutableSequence


@dataclass(frozen=True)
class CommRecord:
    """One collective call as seen by one rank."""

    op: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    seconds: float
    tag: str = ""
    group: str = ""
    started: float = 0.0  # time.perf_counter() when the call began: one clock for every thread and process of a host


@dataclass
class CommStats:
    """All collective calls one rank made since the last :meth:`reset`.

    ``tag`` labels the records that follow (e.g. ``"prefill"`` or
    ``"decode"``) so a caller can split the counts by phase; ``group`` names
    the group whose collectives these are (``"tp"``, ``"pp"`` or ``"ep"``).
    """

    records: list[CommRecord] = field(default_factory=list)
    tag: str = ""
    group: str = ""

    def record(self, op: str, shape: tuple[int, ...], dtype: str, nbytes: int, seconds: float,
               started: float = 0.0) -> None:
        self.records.append(CommRecord(op, tuple(shape), dtype, int(nbytes), float(seconds), self.tag,
                                       self.group, float(started)))

    def reset(self) -> None:
        self.records.clear()

    def _select(self, op: str | None, tag: str | None) -> list[CommRecord]:
        return [
            r for r in self.records
            if (op is None or r.op == op) and (tag is None or r.tag == tag)
        ]

    def count(self, op: str | None = None, tag: str | None = None) -> int:
        """Number of calls, of one op (or all ops), in one phase (or all)."""
        return len(self._select(op, tag))

    def total_bytes(self, op: str | None = None, tag: str | None = None) -> int:
        """Bytes moved, nccl-tests convention (see module docstring)."""
        return sum(r.bytes for r in self._select(op, tag))

    def total_seconds(self, op: str | None = None, tag: str | None = None) -> float:
        return sum(r.seconds for r in self._select(op, tag))

    def counts(self, tag: str | None = None) -> dict[str, int]:
        """{op: number of calls}."""
        return dict(Counter(r.op for r in self._select(None, tag)))

    def summary(self, tag: str | None = None) -> dict[str, dict[str, float]]:
        """{op: {"count", "bytes", "seconds"}}: a JSON-ready digest."""
        out: dict[str, dict[str, float]] = {}
        for r in self._select(None, tag):
            s = out.setdefault(r.op, {"count": 0, "bytes": 0, "seconds": 0.0})
            s["count"] += 1
            s["bytes"] += r.bytes
            s["seconds"] += r.seconds
        return out


# --- where each rank is, for the launcher ------------------------------------------
STARTING, OUTSIDE, RETURNED = "starting", "outside any collective", "returned"
STATES = (STARTING, OUTSIDE, "all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "send", "recv",
          "barrier", RETURNED)
GROUPS = ("tp", "pp", "ep")


class LaunchProgress:
    """The states of the ``world_size`` ranks of one launch, in ``values`` (3 floats per rank; see the module)."""

    def __init__(self, world_size: int, values: MutableSequence[float] | None = None) -> None:
        self.world_size = world_size
        self.values = [0.0] * (3 * world_size) if values is None else values
        now = time.monotonic()
        for rank in range(world_size):
            self.values[3 * rank + 2] = now

    def set(self, rank: int, state: str, group: str = "tp") -> None:
        self.values[3 * rank], self.values[3 * rank + 1] = STATES.index(state), GROUPS.index(group)
        self.values[3 * rank + 2] = time.monotonic()

    def state(self, rank: int) -> str:
        return STATES[int(self.values[3 * rank])]

    def describe(self, rank: int) -> str:
        """E.g. "rank 1: in recv of the pp group for 3.2 s", or "rank 0: outside any collective for 61.0 s"."""
        state, since = self.state(rank), time.monotonic() - self.values[3 * rank + 2]
        if state in (STARTING, OUTSIDE, RETURNED):
            return f"rank {rank}: {state} for {since:.1f} s"
        return f"rank {rank}: in {state} of the {GROUPS[int(self.values[3 * rank + 1])]} group for {since:.1f} s"

    def stalled(self, unfinished: list[int], timeout: float) -> str | None:
        """Why the launch cannot progress, or None: every unfinished rank is outside any collective and no rank
        has changed state for ``timeout`` seconds."""
        if not unfinished or any(self.state(r) not in (OUTSIDE, RETURNED) for r in unfinished):
            return None
        last = max(self.values[3 * r + 2] for r in range(self.world_size))
        if time.monotonic() - last <= timeout:
            return None
        return (f"no rank made progress for {timeout:g} s: rank(s) {unfinished} of {self.world_size} stayed "
                f"outside any collective (stuck, or computing without a collective for longer than the timeout: "
                f"raise timeout= for that) [{self.states(unfinished)}]")

    def states(self, ranks: list[int]) -> str:
        return "; ".join(self.describe(r) for r in ranks)

    def others(self, rank: int) -> str:
        """Where every rank but ``rank`` that had not returned was last (a failed rank stays where it failed)."""
        return self.states([r for r in range(self.world_size) if r != rank and self.state(r) != RETURNED])

    def watch(self, rank: int) -> "RankWatch":
        return RankWatch(self, rank)


class RankWatch:
    """One rank's reporter: :meth:`started` its program, :meth:`enter` a collective of a group, :meth:`leave` it,
    :meth:`returned`."""

    def __init__(self, progress: LaunchProgress, rank: int) -> None:
        self.progress, self.rank = progress, rank

    def started(self) -> None:
        self.progress.set(self.rank, OUTSIDE)

    def enter(self, op: str, group: str) -> None:
        self.progress.set(self.rank, op, group)

    leave = started

    def returned(self) -> None:
        self.progress.set(self.rank, RETURNED)
