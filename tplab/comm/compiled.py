"""Collectives inside a compiled graph: ``torch.ops.tplab.all_reduce``, an operator torch.compile keeps whole.

A :class:`~tplab.comm.group.Dist` collective is Python: it times itself, records the call in ``stats``, tells the
launcher where the rank is, and waits on the other ranks. torch.compile cannot trace that, and would cut the
decode step's graph at every all-reduce (2 · layers + 1 pieces). So while compiling, ``Dist.all_reduce`` calls this
custom operator instead: to the compiler it is one opaque node with a known output (a tensor like its input), and
when the compiled step runs, the node calls back into the same ``Dist.all_reduce``, which records it as always.
The group travels as an integer key into :data:`GROUPS` (an operator's arguments are tensors and numbers).
"""
from __future__ import annotations

import itertools
import weakref

import torch

GROUPS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_keys = itertools.count()


def register(dist) -> int:
    """A new key under which the operator finds ``dist`` for as long as it lives (every Dist takes one when made,
    outside any compiled code)."""
    key = next(_keys)
    GROUPS[key] = dist
    return key


@torch.library.custom_op("tplab::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, group: int) -> torch.Tensor:
    """The sum over the group's ranks of ``x``: ``Dist.all_reduce`` run eagerly on a copy (it may write into its
    input, and an operator must not change its arguments)."""
    return GROUPS[group].eager_all_reduce(x.clone())


@all_reduce.register_fake
def _(x: torch.Tensor, group: int) -> torch.Tensor:
    return torch.empty_like(x)
