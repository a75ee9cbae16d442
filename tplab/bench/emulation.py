"""Emulate one rank of a TP group on one device: real shapes and compute, modelled collectives.

A 70B model at tp=8 needs 8 GPUs to run, but each rank's *work* is fixed by
its shard's shapes: H/tp query heads, I/tp of the MLP, V/tp of the
vocabulary. So one device can build rank 0's shard (random weights, real
shapes) and time its prefill and decode exactly; only the collectives are
missing. :class:`EmulatedTransport` stands in for them. It is duck-typed like
:class:`~tplab.comm.transports.ThreadTransport`, so the unchanged model code runs on a
plain :class:`~tplab.comm.Dist`:

* every collective returns a tensor of the right shape and dtype, and moves
  no data: ``all_reduce(x) -> x`` (the rank's own partial sum),
  ``all_gather(x, dim) -> cat([x] * tp, dim)``, ``reduce_scatter(x, dim) ->``
  chunk ``rank`` of x, ``broadcast(x) -> x``;
* ``dist.stats`` still records each call's op and bytes (the nccl-tests
  convention of :mod:`tplab.comm.stats`), so counts are exact;
* the *seconds* of each call come from the α-β model
  (:func:`modelled_seconds`): NCCL's base latency plus the ring formulas of
  :mod:`tplab.perf.comm` over a link of :mod:`tplab.specs.hardware`, with the link
  efficiency of data/efficiency.json, as the cost model (:mod:`tplab.perf.estimate`)
  charges them:

      all-reduce of S bytes:              base + 2(n-1)(α + S/(nβ))
      all-gather / reduce-scatter (S the full buffer): base + (n-1)(α + S/(nβ))

  with β = link bandwidth × link efficiency.

The values the model computes are not those of the real TP model (each rank
sees only its own partial sums), but the work is: same kernels, same shapes.
Every figure built this way is *emulated*, and labelled so.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tplab.checks import check_int
from tplab.comm.group import Dist
from tplab.comm.stats import CommRecord
from tplab.perf.comm import ring_all_gather_seconds, ring_all_reduce_seconds
from tplab.specs.efficiency import Efficiency
from tplab.specs.hardware import Link

MODELLED_OPS = ("all_reduce", "all_gather", "reduce_scatter")


class EmulatedTransport:
    """Collectives of an absent TP group: right shapes, no data moved (see the module docstring)."""

    def __init__(self, world_size: int, rank: int = 0) -> None:
        check_int("world_size", world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.world_size, self.rank = world_size, rank

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat([t] * self.world_size, dim=dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.chunk(self.world_size, dim=dim)[self.rank].contiguous()

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        return t

    def send(self, t: torch.Tensor, dst: int) -> None:
        return None

    def recv(self, buffer: torch.Tensor, src: int) -> torch.Tensor:
        return buffer

    def barrier(self) -> None:
        return None


def emulated_dist(tp: int, device: torch.device | str = "cpu", rank: int = 0) -> Dist:
    """A Dist for rank ``rank`` of an emulated tp-way group on ``device``.

    On CUDA the collectives are not timed (no synchronize around them), so a
    decode step can be captured in a CUDA graph; their seconds are modelled anyway.
    """
    device = torch.device(device)
    return Dist(rank, tp, device, EmulatedTransport(tp, rank), time_collectives=device.type != "cuda")


@dataclass(frozen=True)
class CommModel:
    """The α-β model of one link: α per hop, β = bandwidth × link efficiency, plus NCCL's base latency."""

    link: Link
    efficiency: Efficiency

    @property
    def label(self) -> str:
        return (f"alpha-beta ring over {self.link.name} ({self.link.bandwidth_gb_s:g} GB/s x {self.efficiency.link:g}, "
                f"alpha {self.link.alpha_us:g} us, base {self.efficiency.collective_base_us:g} us)")

    def seconds(self, op: str, nbytes: float, tp: int) -> float:
        """Modelled seconds of one collective of ``nbytes`` (nccl-tests convention) over ``tp`` ranks; 0 at tp=1."""
        return modelled_seconds(op, nbytes, tp, self.link, self.efficiency)

    def summary(self, records: list[CommRecord], tp: int) -> dict[str, dict[str, float]]:
        """{op: {"count", "bytes", "seconds"}} like CommStats.summary, with modelled seconds."""
        out: dict[str, dict[str, float]] = {}
        for r in records:
            s = out.setdefault(r.op, {"count": 0, "bytes": 0, "seconds": 0.0})
            s["count"] += 1
            s["bytes"] += r.bytes
            s["seconds"] += self.seconds(r.op, r.bytes, tp)
        return out


def modelled_seconds(op: str, nbytes: float, tp: int, link: Link, efficiency: Efficiency) -> float:
    """base + the ring formula of ``op`` (see the module docstring); 0 for tp=1, where nothing is sent."""
    if op not in MODELLED_OPS:
        raise ValueError(f"no alpha-beta formula for {op!r}; the emulation models {', '.join(MODELLED_OPS)}")
    if tp == 1:
        return 0.0
    alpha, beta = link.alpha_us * 1e-6, link.bandwidth_gb_s * 1e9 * efficiency.link
    ring = ring_all_reduce_seconds if op == "all_reduce" else ring_all_gather_seconds
    return efficiency.collective_base_us * 1e-6 + ring(nbytes, tp, alpha, beta)
