"""Ranks started by torchrun: this process is one rank of the group torchrun made (``launch`` under torchrun).

Each process takes its own GPU (cuda:LOCAL_RANK) and NCCL, or the CPU and gloo
where no GPU is visible. torchrun ends the whole group when one process
fails; :func:`report_errors_to_torchrun` makes its summary name that
process's own error.
"""
from __future__ import annotations

import atexit
import functools
import os
import time
from datetime import timedelta
from typing import Any, Callable

import torch

from tplab.comm.grid import GridShape, make_grid, torch_transports
from tplab.comm.group import PeerFailure


def under_torchrun() -> bool:
    """True when this process was started by torchrun (or any env:// launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


PEER_FAILURE_GRACE_S = 5.0


def report_errors_to_torchrun(main: Callable[..., Any]) -> Callable[..., Any]:
    """``main`` as a process's entry point: under torchrun, torchrun's failure summary names the original error.

    An exception ``main`` raises is written where torchrun reads it (torch's
    ``record``), so the summary's root cause shows the rank's traceback, not
    only an exit code. The root cause is the failure torchrun observes first,
    and a rank that only reacts to a failed peer (:class:`PeerFailure`) can
    exit in the same instant as the peer: such a rank waits up to
    ``PEER_FAILURE_GRACE_S`` before exiting, during which torchrun, having seen
    the peer fail, stops it. (The same preference as ``launch``'s for the
    error that is not a peer's reaction.) Unchanged outside torchrun.
    """
    if not under_torchrun():
        return main
    from torch.distributed.elastic.multiprocessing.errors import record

    @functools.wraps(main)
    def reacting_ranks_exit_last(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except PeerFailure:
            time.sleep(PEER_FAILURE_GRACE_S)
            raise
    return record(reacting_ranks_exit_last)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def _destroy_process_group() -> None:
    import torch.distributed as td
    if td.is_initialized():
        td.destroy_process_group()


def launch_torchrun(fn: Callable[..., Any], shape: GridShape, timeout: float, args: tuple, kwargs: dict,
                    threads: int) -> list[Any]:
    """``fn(dist, *args, **kwargs)`` on this process's rank; every rank's result (on the CPU), in rank order."""
    import torch.distributed as td
    torch.set_num_threads(threads)
    world_size = int(os.environ["WORLD_SIZE"])
    if shape.world_size != world_size:
        grid = f"tp={shape.tp}" if shape.pp == 1 else f"tp={shape.tp} x pp={shape.pp}"
        raise ValueError(f"{grid} but torchrun started WORLD_SIZE={world_size} processes; "
                         f"run torchrun --nproc-per-node {shape.world_size}, or pass a grid of {world_size} ranks")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if not td.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        td.init_process_group("nccl" if device.type == "cuda" else "gloo",
                              timeout=timedelta(seconds=timeout))
        # A process group left alive at interpreter exit can abort the process from its
        # C++ destructor ("terminate called without an active exception"): tear it down first.
        atexit.register(_destroy_process_group)
    transports = torch_transports(shape, td.get_rank())
    dist = make_grid(shape, td.get_rank(), device, lambda kind, index, members: transports[(kind, index)])
    out = _to_cpu(fn(dist, *args, **kwargs))
    for group in transports.values():
        group.wait_sends()
    gathered: list[Any] = [None] * world_size
    td.all_gather_object(gathered, out)
    return gathered
