"""launch: run one rank program on N ranks and collect the results.

``launch(fn, tp, backend)`` calls ``fn(dist, *args, **kwargs)`` once per rank
and returns ``[result_0, ..., result_{tp-1}]``. Three ways to get ranks:

* ``backend="threads"``: tp threads in this process (notebooks; every rank's
  tensors can be inspected; reductions are deterministic). ``device`` puts
  every rank on one device: ``device="cuda"`` runs a real TP group on a
  single GPU (each collective adds the ranks' tensors there), which checks
  the TP model on CUDA without a multi-GPU node; it is not a speed test.
* ``backend="gloo"``: tp spawned processes with torch.distributed over gloo on
  the CPU. ``fn`` must be importable (defined in a module, not a notebook).
* under ``torchrun`` (RANK and WORLD_SIZE in the environment): this process is
  one rank of the existing group (NCCL on GPUs, gloo on CPUs), whatever
  ``backend`` says. ``torchrun --nproc-per-node 8 -m tplab generate --tp 8 ...``

Failure is never a hang: when a rank raises, the others are stopped and the
original exception is re-raised here, with the rank's traceback in its notes.
When a gloo process dies, the rest are killed and :class:`RankDiedError` is
raised. ``timeout`` bounds how long any rank waits for its peers: a rank that
does not join a collective in time, or returns while the others wait in one,
gives :class:`~tplab.dist.CollectiveTimeout` (a thread rank stuck in its own
computation cannot be stopped: launch returns once it does).
"""
from __future__ import annotations

import atexit
import functools
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch

from tplab.dist import CollectiveTimeout, Dist, PeerFailure
from tplab.transports import ThreadGroup, ThreadTransport, TorchTransport

BACKENDS = ("threads", "gloo")


class RankDiedError(RuntimeError):
    """A rank's process ended without returning a result or an error."""


def under_torchrun() -> bool:
    """True when this process was started by torchrun (or any env:// launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(fn: Callable[..., Any], tp: int, backend: str = "threads", timeout: float = 300.0,
           args: tuple = (), kwargs: dict | None = None, device: torch.device | str | None = None) -> list[Any]:
    """Run ``fn(dist, *args, **kwargs)`` on ``tp`` ranks; return the results in rank order.

    ``device``: where thread ranks compute (default the CPU; "cuda": all on one
    GPU). gloo ranks compute on the CPU; under torchrun each process takes its
    own GPU (cuda:LOCAL_RANK), or the CPU where none is visible.
    """
    kwargs = kwargs or {}
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    check_device(backend, device)
    if under_torchrun():
        return _launch_torchrun(fn, tp, timeout, args, kwargs)
    if backend == "threads":
        return _launch_threads(fn, tp, timeout, args, kwargs, thread_device(device))
    if backend == "gloo":
        return _launch_gloo(fn, tp, timeout, args, kwargs)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} "
                     "(for NCCL on GPUs, start the program with torchrun)")


def _first_error(errors: dict[int, BaseException]) -> tuple[int, BaseException]:
    """The error that caused the failure: the first (in arrival order) that is not a peer's reaction."""
    for rank, err in errors.items():
        if not isinstance(err, PeerFailure):
            return rank, err
    return next(iter(errors.items()))


def check_device(backend: str, device: torch.device | str | None) -> None:
    """ValueError, saying what to do, unless ranks of ``backend`` can compute on ``device`` (None: their default)."""
    if device is None or backend not in BACKENDS:
        return
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


def _launch_threads(fn, tp, timeout, args, kwargs, device):
    group = ThreadGroup(tp, timeout)
    results: list[Any] = [None] * tp
    errors: dict[int, BaseException] = {}

    def run_rank(rank: int) -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the current device is per thread
        dist = Dist(rank, tp, device, ThreadTransport(group, rank))
        try:
            results[rank] = fn(dist, *args, **kwargs)
            group.rank_returned(rank)
        except BaseException as e:  # noqa: BLE001 - every failure must reach the caller
            errors[rank] = e
            group.abort()

    threads = [threading.Thread(target=run_rank, args=(r,), name=f"tplab-rank{r}", daemon=True) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        rank, err = _first_error(errors)
        err.add_note(f"raised on rank {rank} of {tp} (threads backend)")
        raise err
    return results


# --- gloo processes -----------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that no one holds at the moment of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_picklable(fn) -> None:
    main = sys.modules.get("__main__")
    interactive = getattr(fn, "__module__", None) == "__main__" and not hasattr(main, "__file__")
    try:
        pickle.dumps(fn)
    except Exception as e:  # noqa: BLE001
        raise TypeError(f"backend='gloo' needs an importable function, and {fn!r} cannot be pickled ({e}). "
                        "Define it at the top level of a .py module, or use backend='threads'.") from None
    if interactive:
        raise TypeError(f"{fn.__qualname__} is defined in a notebook or REPL, which spawned gloo processes "
                        "cannot import. Move it into a .py module (tplab keeps every rank program in the "
                        "package), or use backend='threads'.")


def _gloo_rank_main(rank, world_size, port, fn, args, kwargs, timeout, threads_per_rank, results):
    torch.set_num_threads(threads_per_rank)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    import torch.distributed as td
    try:
        td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                              world_size=world_size, timeout=timedelta(seconds=timeout))
        dist = Dist(rank, world_size, torch.device("cpu"), TorchTransport())
        results.put(("ok", rank, pickle.dumps(fn(dist, *args, **kwargs))))
    except BaseException as e:  # noqa: BLE001
        tb = traceback.format_exc()
        try:
            payload = pickle.dumps(e)
        except Exception:  # noqa: BLE001 - an unpicklable exception still reports its text
            payload = pickle.dumps(RuntimeError(f"{type(e).__name__}: {e}"))
        results.put(("error", rank, (payload, tb)))
    finally:
        if td.is_initialized():
            td.destroy_process_group()


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 2.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _exit_reason(code: int) -> str:
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def _process_context(fn):
    """A forkserver that has imported torch once, so each rank starts in ~0.1 s, not seconds.

    Where there is no forkserver (Windows), plain spawn: each rank imports torch itself.
    """
    import multiprocessing as mp
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tplab", fn.__module__])
    return ctx


def _launch_gloo(fn, tp, timeout, args, kwargs):
    _check_picklable(fn)
    ctx = _process_context(fn)
    results_q = ctx.Queue()
    port = free_port()
    threads_per_rank = max(1, (os.cpu_count() or 1) // tp)
    procs = [ctx.Process(target=_gloo_rank_main, name=f"tplab-rank{r}", daemon=True,
                         args=(r, tp, port, fn, args, kwargs, timeout, threads_per_rank, results_q))
             for r in range(tp)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}  # in arrival order
    first_done_at = first_error_at = None
    try:
        while len(results) + len(errors) < tp:
            try:
                kind, rank, payload = results_q.get(timeout=0.05)
            except queue.Empty:
                kind = None
            if kind == "ok":
                results[rank] = pickle.loads(payload)
                first_done_at = first_done_at or time.monotonic()
            elif kind == "error":
                exc_bytes, tb = payload
                err = pickle.loads(exc_bytes)
                err.add_note(f"raised on rank {rank} of {tp} (gloo backend); its traceback:\n{tb}")
                errors[rank] = err
            for rank, p in enumerate(procs):
                if rank not in results and rank not in errors and p.exitcode not in (None, 0):
                    errors[rank] = RankDiedError(
                        f"rank {rank} of {tp} (pid {p.pid}) died: {_exit_reason(p.exitcode)}; the other ranks were stopped")
            now = time.monotonic()
            if errors:
                first_error_at = first_error_at or now
                # A peer's connection error often arrives before the cause: wait briefly for it.
                if any(not isinstance(e, PeerFailure) for e in errors.values()) or now - first_error_at > 2.0:
                    break
            elif first_done_at and now - first_done_at > timeout:
                missing = sorted(set(range(tp)) - set(results))
                raise CollectiveTimeout(f"ranks {missing} did not finish within {timeout:g} s of the first rank")
    finally:
        if errors or len(results) < tp:
            _stop(procs)
        else:
            for p in procs:
                p.join()
    if errors and results and all(isinstance(e, PeerFailure) for e in errors.values()):
        raise CollectiveTimeout(f"ranks {sorted(errors)} were in a collective that ranks {sorted(results)} "
                                "returned without joining: every rank must call the same collectives in the same order")
    if errors:
        raise _first_error(errors)[1]
    return [results[r] for r in range(tp)]


# --- torchrun -----------------------------------------------------------------
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


def _launch_torchrun(fn, tp, timeout, args, kwargs):
    import torch.distributed as td
    world_size = int(os.environ["WORLD_SIZE"])
    if tp != world_size:
        raise ValueError(f"tp={tp} but torchrun started WORLD_SIZE={world_size} processes; "
                         f"run torchrun --nproc-per-node {tp}, or pass tp={world_size}")
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
    dist = Dist(td.get_rank(), world_size, device, TorchTransport())
    out = _to_cpu(fn(dist, *args, **kwargs))
    gathered: list[Any] = [None] * world_size
    td.all_gather_object(gathered, out)
    return gathered
