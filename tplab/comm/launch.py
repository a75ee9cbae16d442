"""launch: run one rank program on N ranks and collect the results.

``launch(fn, tp, backend)`` calls ``fn(dist, *args, **kwargs)`` once per rank
and returns ``[result_0, ..., result_{tp-1}]``. Three ways to get ranks:

* ``backend="threads"``: tp threads in this process (notebooks; every rank's
  tensors can be inspected; reductions are deterministic). ``device`` puts
  every rank on one device: ``device="cuda"`` runs a real TP group on a
  single GPU (each collective adds the ranks' tensors there), which checks
  the TP model on CUDA without a multi-GPU node; it is not a speed test.
* ``backend="gloo"``: tp spawned processes with torch.distributed over gloo on
  the CPU, their all-reduce, all-gather, reduce-scatter and broadcast through
  shared memory (:mod:`tplab.comm.shm`; Linux x86-64, else plain gloo);
  ``backend="gloo-tcp"``: the same processes with every collective over gloo's
  loopback TCP, to compare. ``fn`` must be importable (defined in a module,
  not a notebook). (:mod:`tplab.comm.gloo`)
* under ``torchrun`` (RANK and WORLD_SIZE in the environment): this process is
  one rank of the existing group (NCCL on GPUs, gloo on CPUs), whatever
  ``backend`` says. ``torchrun --nproc-per-node 8 -m tplab generate --tp 8 ...``
  (:mod:`tplab.comm.torchrun`)

Failure is never a hang: when a rank raises, the others are stopped and the
original exception is re-raised here, with the rank's traceback in its notes.
When a gloo process dies, the rest are killed and :class:`RankDiedError` is
raised. ``timeout`` bounds how long any rank waits for its peers: a rank that
does not join a collective in time, or returns while the others wait in one,
gives :class:`~tplab.comm.CollectiveTimeout` naming the rank that never
joined and what it was doing. It also bounds a launch in which every rank is
outside any collective and none changes state for ``timeout`` seconds
(the progress part of :mod:`tplab.comm.stats`): all stuck, or computing without a collective for
longer than that. On threads, launch returns within the timeout even then: a thread
cannot be killed, so a rank stuck in its own computation is abandoned (its
daemon thread ends with the process) and named in the error. Ctrl-C stops
every rank (gloo processes are terminated; thread ranks in a collective are
woken) and re-raises KeyboardInterrupt here.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any, Callable

import torch

from tplab.checks import check_threads
from tplab.comm.gloo import RankDiedError, launch_gloo
from tplab.comm.grid import GridShape, make_grid
from tplab.comm.group import CollectiveTimeout, first_error
from tplab.comm.stats import LaunchProgress
from tplab.comm.torchrun import launch_torchrun, under_torchrun
from tplab.comm.transports import ThreadGroup, ThreadTransport

__all__ = ["BACKENDS", "RankDiedError", "check_device", "default_threads", "launch", "thread_device", "under_torchrun"]

BACKENDS = ("threads", "gloo", "gloo-tcp")
PEER_GRACE_S = 1.0  # after a rank fails, how long the others get to notice before they are abandoned


def launch(fn: Callable[..., Any], tp: int, backend: str = "threads", timeout: float = 300.0,
           args: tuple = (), kwargs: dict | None = None, device: torch.device | str | None = None,
           threads: int | None = None, *, pp: int = 1, ep: int = 1) -> list[Any]:
    """Run ``fn(dist, *args, **kwargs)`` on the tp x pp ranks of a grid; return the results in global rank order.

    ``dist`` is the rank's TP group (:class:`Dist`), and ``dist.grid`` (:class:`~tplab.comm.grid.Grid`) its place
    in the grid: the pipeline group ``grid.pp`` (stage s = its rank there), the expert group ``grid.ep`` (ep ranks
    of the TP group), the stage's neighbours. Global rank g is rank g mod tp of stage g // tp. With pp = ep = 1
    (the default) this is tensor parallelism on tp ranks.

    ``device``: where thread ranks compute (default the CPU; "cuda": all on one
    GPU). gloo ranks compute on the CPU; under torchrun each process takes its
    own GPU (cuda:LOCAL_RANK), or the CPU where none is visible.

    ``threads``: torch intra-op threads per rank (default :func:`default_threads`:
    the cores shared out among the ranks of this machine, so the ranks never
    oversubscribe the CPU; more ranks than cores get one thread each).
    """
    kwargs = kwargs or {}
    if not callable(fn):
        raise TypeError(f"launch runs a rank program fn(dist, *args, **kwargs); got {fn!r}, which is not callable")
    shape = GridShape(tp, pp, ep)
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    check_threads(threads)
    check_device(backend, device)
    if under_torchrun():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", shape.world_size))
        return launch_torchrun(fn, shape, timeout, args, kwargs, threads or default_threads(local))
    threads = threads or default_threads(shape.world_size)
    if backend == "threads":
        return _launch_threads(fn, shape, timeout, args, kwargs, thread_device(device), threads)
    if backend in ("gloo", "gloo-tcp"):
        return launch_gloo(fn, shape, timeout, args, kwargs, threads, shared_memory=backend == "gloo")
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} "
                     "(for NCCL on GPUs, start the program with torchrun)")


def default_threads(ranks_here: int) -> int:
    """Intra-op threads per rank: max(1, cores // ranks on this machine)."""
    return max(1, (os.cpu_count() or 1) // ranks_here)


def rank_device_type(device: torch.device | str | None) -> str:
    """Where the ranks will compute: the device asked for, else "cuda" under torchrun with a GPU visible, else "cpu"."""
    if device is not None:
        return torch.device(device).type
    return "cuda" if under_torchrun() and torch.cuda.is_available() else "cpu"


def check_device(backend: str, device: torch.device | str | None) -> None:
    """ValueError, saying what to do, unless ranks of ``backend`` can compute on ``device`` (None: their default)."""
    if device is None or backend not in BACKENDS:
        return
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if under_torchrun():
        raise ValueError("under torchrun each process takes its own device (cuda:LOCAL_RANK, or the CPU): "
                         "do not pass a device")
    if backend == "threads":
        thread_device(device)
    elif torch.device(device).type != "cpu":
        raise ValueError(f"backend={backend!r} runs its ranks on the CPU; for device={str(device)!r} use "
                         "backend='threads' (every rank on one GPU) or torchrun (one GPU per rank)")


# --- threads ------------------------------------------------------------------
def thread_device(device: torch.device | str | None) -> torch.device:
    """The device thread ranks share: the CPU by default; a CUDA device only where one is visible."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but no CUDA device is visible: use device='cpu'")
        index = torch.cuda.current_device() if device.index is None else device.index
        if not 0 <= index < torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s) "
                             "are visible")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"thread ranks run on 'cpu' or 'cuda', not {str(device)!r}")
    return device


def _launch_threads(fn, shape: GridShape, timeout, args, kwargs, device, threads):
    tp = shape.world_size  # the ranks to wait for (named tp in the errors of a grid of one stage)
    groups = {(kind, index): (ThreadGroup(len(members), timeout), members)
              for kind, index, members in shape.exchanging_groups()}
    progress = LaunchProgress(tp)
    results: list[Any] = [None] * tp
    errors: dict[int, BaseException] = {}  # in arrival order
    finished: queue.Queue[int] = queue.Queue()

    def run_rank(rank: int) -> None:
        try:
            torch.set_num_threads(threads)
            if device.type == "cuda":
                torch.cuda.set_device(device)  # the current device is per thread
            dist = make_grid(shape, rank, device, lambda kind, index, members: ThreadTransport(
                groups[(kind, index)][0], members.index(rank)), watch=progress.watch(rank))
            dist.watch.started()
            results[rank] = fn(dist, *args, **kwargs)
            dist.watch.returned()
            for group, members in groups.values():
                if rank in members:
                    group.rank_returned(members.index(rank))
        except BaseException as e:  # noqa: BLE001 - every failure must reach the caller
            errors[rank] = e
            for group, _ in groups.values():
                group.abort()
        finally:
            finished.put(rank)

    callers_threads = torch.get_num_threads()  # torch's setting may be process-wide: restored below
    for r in range(tp):
        threading.Thread(target=run_rank, args=(r,), name=f"tplab-rank{r}", daemon=True).start()
    try:
        return _collect(tp, timeout, results, errors, finished, progress)
    except KeyboardInterrupt:
        for group, _ in groups.values():
            group.abort()  # ranks waiting in a collective stop; the caller exits (a computing thread cannot be stopped)
        raise
    finally:
        torch.set_num_threads(callers_threads)


def _collect(tp, timeout, results, errors, finished, progress: LaunchProgress):
    """Wait for the thread ranks: their results, or the first error; never longer than ``timeout`` without
    progress (the progress part of :mod:`tplab.comm.stats`), and a short grace for the others after a failure."""
    done: set[int] = set()
    error_deadline = None
    while len(done) < tp:
        try:
            done.add(finished.get(timeout=0.05))
            continue
        except queue.Empty:
            pass
        now = time.monotonic()
        if errors:  # a timed-out rank already waited for the stuck ones: no grace then
            grace = 0.0 if isinstance(first_error(errors)[1], CollectiveTimeout) else PEER_GRACE_S
            error_deadline = error_deadline or now + grace
            if now >= error_deadline:
                break
        elif stalled := progress.stalled(sorted(set(range(tp)) - done), timeout):
            raise CollectiveTimeout(f"{stalled}; they were abandoned (a thread cannot be stopped)")
    stuck = sorted(set(range(tp)) - done)
    if errors:
        rank, err = first_error(errors)
        err.add_note(f"raised on rank {rank} of {tp} (threads backend)")
        if others := progress.others(rank):
            err.add_note(f"the other ranks: {others}" + (f"; rank(s) {stuck} were abandoned" if stuck else ""))
        raise err
    return results
