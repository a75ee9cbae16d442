"""CommStats: the record of every collective a rank ran.

Each call through :class:`tplab.comm.Dist` appends one :class:`CommRecord`
(op, shape, dtype, bytes, seconds). Tests assert exact counts on it, notebooks
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
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


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

    def record(self, op: str, shape: tuple[int, ...], dtype: str, nbytes: int, seconds: float) -> None:
        self.records.append(CommRecord(op, tuple(shape), dtype, int(nbytes), float(seconds), self.tag,
                                          self.group))

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
