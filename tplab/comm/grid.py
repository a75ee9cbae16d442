"""The grid: tp x pp ranks, and the three groups each rank belongs to.

Global rank g = s * tp + t is rank t of pipeline stage s: the tp ranks of a stage are neighbours (on a GPU node,
the GPUs joined by NVLink), and the stages follow one another (across a slower link, if need be).

* the **TP group** of (s, t): the tp ranks of stage s. Every parallel layer takes it; its all-reduces are the
  per-layer cost of tensor parallelism.
* the **pipeline group** of (s, t): the ranks (0, t), (1, t), ..., (pp-1, t). Its rank s is stage s, so an
  activation goes from stage s to stage s+1 by one send/recv inside it.
* the **expert group**: ep consecutive ranks of the TP group (ep divides tp). Experts reuse the TP ranks instead
  of a dimension of their own: in inference every rank of a stage is busy with its attention shard, and the MoE
  layer that follows runs on the same ranks, whether it splits each expert across them (TP of experts) or gives
  each rank whole experts (EP, as vLLM's expert parallelism turns the TP group into the expert group). A
  dedicated dimension would multiply the ranks and leave them idle outside the MoE layers.

A rank program receives its TP group's :class:`~tplab.comm.group.Dist` (what every layer takes, as with one
stage) and finds the rest in ``dist.grid``: ``grid.pp``, ``grid.ep``, the stage and its neighbours. Each group
has its own instrumented collectives and :class:`~tplab.comm.stats.CommStats`, tagged with the group's name.
A grid of one stage and ep = 1 is tensor parallelism alone: the other groups are groups of one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tplab.checks import check_int
from tplab.comm.group import Dist
from tplab.comm.stats import CommStats, RankWatch
from tplab.comm.transports import SoloTransport, TorchTransport
from tplab.specs.sharding import divisors

GROUP_KINDS = ("tp", "pp", "ep")


@dataclass(frozen=True)
class GridShape:
    """tp ranks per stage, pp stages, and experts spread over ep ranks of each TP group."""

    tp: int
    pp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in GROUP_KINDS:
            check_int(name, getattr(self, name))
        if self.tp % self.ep:
            raise ValueError(f"ep={self.ep} does not divide tp={self.tp}: the expert group is ep ranks of the TP "
                             f"group; valid ep: {', '.join(map(str, divisors(self.tp)))}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def coords(self, rank: int) -> tuple[int, int]:
        """(stage, rank within the stage) of global rank ``rank``."""
        return divmod(rank, self.tp)

    def groups(self, kind: str) -> list[list[int]]:
        """Every group of one kind, as lists of global ranks (ordered by their rank in the group)."""
        tp, pp, ep = self.tp, self.pp, self.ep
        if kind == "tp":
            return [[s * tp + t for t in range(tp)] for s in range(pp)]
        if kind == "pp":
            return [[s * tp + t for s in range(pp)] for t in range(tp)]
        if kind == "ep":
            return [[s * tp + e * ep + k for k in range(ep)] for s in range(pp) for e in range(tp // ep)]
        raise ValueError(f"unknown group kind {kind!r}; one of {GROUP_KINDS}")

    def exchanging_groups(self) -> list[tuple[str, int, list[int]]]:
        """(kind, index, members) of every group of more than one rank, in one fixed order: the groups a backend
        must build (a group of one moves no data)."""
        return [(kind, index, members) for kind in GROUP_KINDS
                for index, members in enumerate(self.groups(kind)) if len(members) > 1]

    def group_of(self, kind: str, rank: int) -> tuple[int, list[int]]:
        """(index among the groups of ``kind``, members) of the group of ``kind`` that holds ``rank``."""
        return next((i, members) for i, members in enumerate(self.groups(kind)) if rank in members)


class Grid:
    """One rank's place in the grid: its global rank, its stage, and its three groups (each a :class:`Dist`)."""

    def __init__(self, shape: GridShape, rank: int, tp: Dist, pp: Dist, ep: Dist) -> None:
        self.shape, self.rank = shape, rank
        self.tp, self.pp, self.ep = tp, pp, ep
        for dist in (tp, pp, ep):
            dist.grid = self

    def __repr__(self) -> str:
        return f"Grid(rank={self.rank}, stage={self.stage}, tp_rank={self.tp.rank}, shape={self.shape})"

    @property
    def stage(self) -> int:
        return self.pp.rank

    @property
    def num_stages(self) -> int:
        return self.pp.world_size

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def prev_stage(self) -> int | None:
        """The pipeline-group rank that feeds this stage, or None on the first stage."""
        return None if self.is_first_stage else self.stage - 1

    @property
    def next_stage(self) -> int | None:
        """The pipeline-group rank this stage feeds, or None on the last stage."""
        return None if self.is_last_stage else self.stage + 1

    def stats(self) -> dict[str, CommStats]:
        """{group name: the record of its collectives} for this rank."""
        return {kind: getattr(self, kind).stats for kind in GROUP_KINDS}


def make_grid(shape: GridShape, rank: int, device: torch.device,
              transport_for: Callable[[str, int, list[int]], object], time_collectives: bool = True,
              watch: RankWatch | None = None) -> Dist:
    """Rank ``rank``'s three groups, built with ``transport_for(kind, index, members)`` for each group of more than
    one rank (a group of one needs none); returns the TP group's Dist, with ``.grid`` set. ``watch``: where every
    group reports its collectives for the launcher (the progress part of :mod:`tplab.comm.stats`)."""
    dists = {}
    for kind in GROUP_KINDS:
        index, members = shape.group_of(kind, rank)
        transport = transport_for(kind, index, members) if len(members) > 1 else SoloTransport()
        dists[kind] = Dist(members.index(rank), len(members), device, transport, time_collectives, group=kind)
        dists[kind].watch = watch
    return Grid(shape, rank, **dists).tp


def torch_transports(shape: GridShape, rank: int) -> dict[tuple[str, int], TorchTransport]:
    """This process's groups of the torch.distributed world, as transports, keyed by (kind, index).

    Every process must create every group, its own or not, in the same order (torch.distributed's rule for
    ``new_group``); a group of the whole world is the default group, a group of one needs none.
    """
    import torch.distributed as td
    mine = {}
    for kind, index, members in shape.exchanging_groups():
        group = None if len(members) == shape.world_size else td.new_group(members)
        if rank in members:
            mine[(kind, index)] = TorchTransport(group, members)
    return mine
