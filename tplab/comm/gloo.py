"""Gloo ranks: one process per rank of the grid, torch.distributed over gloo on this CPU (``launch(..., "gloo")``).

Each rank is a process forked from a forkserver that has imported torch (so a
launch costs ~0.2 s); the rank program must be importable, since the
processes import it. With ``shared_memory`` (the default of ``backend="gloo"``
where :func:`tplab.comm.shm.available`), all-reduce, all-gather,
reduce-scatter and broadcast go through one shared-memory segment per group
(:mod:`tplab.comm.shm`), the rest through gloo; ``backend="gloo-tcp"`` keeps
plain gloo over loopback TCP for every collective. Results and errors come back through a queue: the first
error that is not a peer's reaction is re-raised with the rank's traceback in
its notes; a process that dies without reporting gives :class:`RankDiedError`;
in every case the other processes are stopped. Never a hang.
"""
from __future__ import annotations

import ast
import contextlib
import os
import pickle
import queue
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tplab.comm import shm
from tplab.comm.grid import GridShape, make_grid, torch_transports
from tplab.comm.group import CollectiveTimeout, PeerFailure, first_error
from tplab.comm.stats import LaunchProgress


class RankDiedError(RuntimeError):
    """A rank's process ended without returning a result or an error."""


class RendezvousError(RuntimeError):
    """gloo could not connect the ranks (before any rank program ran): the launch is retried once with a new store."""


EXIT_GRACE_S = 0.5  # a rank that exited with code 0 may still have its result in the pipe: read it first


def rendezvous_file(directory: str) -> str:
    """The file through which the ranks of one launch find each other (a torch.distributed FileStore).

    A file in a private folder (mode 0700) rather than a TCP store: torch's TCP store listens on every network
    interface whatever address it is given, and a single-host launch must accept connections from this host only.
    """
    return os.path.join(directory, "store")


def _has_main_guard(script: str) -> bool:
    """Whether a script has a top-level ``if __name__ == "__main__":`` (its processes must not re-run it)."""
    try:
        tree = ast.parse(Path(script).read_text())
    except (OSError, SyntaxError, ValueError):
        return True  # cannot tell: let it run
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


def _check_picklable(fn) -> None:
    main = sys.modules.get("__main__")
    in_main = getattr(fn, "__module__", None) == "__main__"
    interactive = in_main and not hasattr(main, "__file__")
    try:
        pickle.dumps(fn)
    except Exception as e:  # noqa: BLE001
        raise TypeError(f"backend='gloo' needs an importable function, and {fn!r} cannot be pickled ({e}). "
                        "Define it at the top level of a .py module, or use backend='threads'.") from None
    if interactive:
        raise TypeError(f"{fn.__qualname__} is defined in a notebook or REPL, which spawned gloo processes "
                        "cannot import. Move it into a .py module (tplab keeps every rank program in the "
                        "package), or use backend='threads'.")
    if in_main and not _has_main_guard(main.__file__):
        raise TypeError(f"{main.__file__} calls launch(..., backend='gloo') without an `if __name__ == "
                        "\"__main__\":` block: every rank process imports the script and would run it again. Put "
                        "the launch call under `if __name__ == \"__main__\":`.")


def bind_to_cores(rank: int, ranks: int, threads_per_rank: int) -> None:
    """Pin this rank's process to cores of its own, the ``threads_per_rank`` after those of the ranks before it
    among the cores this process may use, when all ``ranks`` fit without sharing (vLLM's CPU workers bind their
    threads the same way): the OS then never moves a rank's threads onto a core another rank computes on (on a
    2-core CPU, a 374M model serving 64 requests at tp 2: 143.5 output tok/s against 129.7 unpinned, one recorded
    round each, data/measurements/vs_vllm/). Nothing changes where the ranks would share a core, or where the OS
    has no affinity call (macOS)."""
    if not hasattr(os, "sched_setaffinity"):
        return
    allowed = sorted(os.sched_getaffinity(0))
    if ranks * threads_per_rank <= len(allowed):
        os.sched_setaffinity(0, allowed[rank * threads_per_rank:(rank + 1) * threads_per_rank])


def end_with_launcher(launcher_alive) -> None:
    """End this rank's process when its launcher is gone, killed outright (``kill -9``, the OOM killer) with no
    chance to stop its ranks: ``launcher_alive`` is the read end of a pipe whose only write end the launcher holds,
    so a read returns (end of file) only when the launcher's process has ended."""
    def watch() -> None:
        try:
            launcher_alive.recv()
        except (EOFError, OSError):
            pass
        os._exit(1)
    threading.Thread(target=watch, name="tplab-launcher-watch", daemon=True).start()


@contextlib.contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """A Ctrl-C during the block is raised when it ends (in the main thread, where Python takes signals)."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _gloo_rank_main(rank, shape, store_file, fn, args, kwargs, timeout, threads_per_rank, results, shm_names, progress,
                    launcher_alive):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle: it stops every rank
    end_with_launcher(launcher_alive)
    bind_to_cores(rank, shape.world_size, threads_per_rank)
    torch.set_num_threads(threads_per_rank)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    import torch.distributed as td
    segments: list[shm.SharedMemoryTransport] = []
    try:
        try:
            store = td.FileStore(store_file, shape.world_size)
            td.init_process_group("gloo", store=store, rank=rank, world_size=shape.world_size,
                                  timeout=timedelta(seconds=timeout))
        except RuntimeError as e:
            raise RendezvousError(f"gloo could not connect rank {rank} to its peers: {e}") from None
        transports = torch_transports(shape, rank)
        groups = list(transports.values())  # torch.distributed's, before shared memory wraps any
        for key, name in shm_names.items():
            if key in transports:  # one segment per group of this rank, opened in the same order by its members
                segments.append(shm.SharedMemoryTransport.open(name, transports[key].rank,
                                                               transports[key].world_size, transports[key], timeout))
                transports[key] = segments[-1]
        watch = progress.watch(rank)
        dist = make_grid(shape, rank, torch.device("cpu"), lambda kind, index, members: transports[(kind, index)],
                         watch=watch)
        watch.started()
        result = pickle.dumps(fn(dist, *args, **kwargs))
        for group in groups:
            group.wait_sends()
        watch.returned()
        results.put(("ok", rank, result))
    except BaseException as e:  # noqa: BLE001
        for segment in segments:
            segment.abort()  # peers waiting in a shared-memory collective raise now, not at the timeout
        tb = traceback.format_exc()
        try:
            payload = pickle.dumps(e)
        except Exception:  # noqa: BLE001 - an unpicklable exception still reports its text
            payload = pickle.dumps(RuntimeError(f"{type(e).__name__}: {e}"))
        results.put(("error", rank, (payload, tb)))
    finally:
        for segment in segments:
            segment.close()
        if td.is_initialized():
            td.destroy_process_group()


def _stop(procs) -> None:
    procs = [p for p in procs if p.pid is not None]  # the started ones
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

    The forkserver is started with Ctrl-C ignored, which it keeps while it imports (a process inherits an ignored
    signal, and Python leaves it so): a Ctrl-C in those seconds is the launcher's to handle, as it is once the
    forkserver runs, and no traceback of an interrupted import reaches the terminal. Where there is no forkserver
    (Windows), plain spawn: each rank imports torch itself.
    """
    import multiprocessing as mp
    from multiprocessing import forkserver
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tplab.engine", fn.__module__])  # what a rank program runs on
    handler = signal.getsignal(signal.SIGINT)  # None: set outside Python, which could not be restored
    if threading.current_thread() is threading.main_thread() and handler is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGINT, handler)
    return ctx


def launch_gloo(fn: Callable[..., Any], shape: GridShape, timeout: float, args: tuple, kwargs: dict,
                threads_per_rank: int, shared_memory: bool = True) -> list[Any]:
    """``fn(dist, *args, **kwargs)`` on the grid's gloo processes; their results in rank order (module docstring).

    A failed rendezvous (gloo's full mesh of TCP connections, seen to fail now and then at tp=8 on a busy
    2-core machine, before any rank program has run) is retried once with a new store. The ranks' own sockets
    (gloo's pairs) listen on the loopback interface only.
    """
    _check_picklable(fn)
    ctx = _process_context(fn)
    backend = "gloo" if shared_memory else "gloo-tcp"  # as the caller named it, for the error notes
    shared_memory = shared_memory and shm.available()
    try:
        return _launch_once(ctx, fn, shape, timeout, args, kwargs, threads_per_rank, shared_memory, backend)
    except RendezvousError:
        return _launch_once(ctx, fn, shape, timeout, args, kwargs, threads_per_rank, shared_memory, backend)


def _launch_once(ctx, fn, shape, timeout, args, kwargs, threads_per_rank, shared_memory, backend) -> list[Any]:
    tp = shape.world_size  # the processes (named tp in the errors of a grid of one stage)
    # one segment per group of more than one rank, under a name nobody can guess (or plant a file at)
    shm_names = {(kind, index): f"tplab-{secrets.token_hex(12)}"
                 for kind, index, _ in shape.exchanging_groups()} if shared_memory else {}
    for name in shm_names.values():
        if (shm.SHM_DIR / name).exists():
            raise shm.clash(shm.SHM_DIR / name)
    results_q = ctx.Queue()
    rendezvous = tempfile.mkdtemp(prefix="tplab-rendezvous-")  # mode 0700: this user's processes only
    store_file = rendezvous_file(rendezvous)
    progress = LaunchProgress(tp, ctx.RawArray("d", 3 * tp))  # every rank's state, in shared memory
    launcher_alive, alive_writer = ctx.Pipe(duplex=False)  # the write end stays here (end_with_launcher)
    procs = [ctx.Process(target=_gloo_rank_main, name=f"tplab-rank{r}", daemon=True,
                         args=(r, shape, store_file, fn, args, kwargs, timeout, threads_per_rank, results_q, shm_names,
                               progress, launcher_alive))
             for r in range(tp)]
    results: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}  # in arrival order
    first_error_at = None
    exited_at: dict[int, float] = {}  # ranks seen exited with code 0 before their result arrived
    try:
        with ctrl_c_deferred():  # a rank whose program was half sent would die with a traceback of its own
            for p in procs:
                p.start()
        while len(results) + len(errors) < tp:
            try:
                kind, rank, payload = results_q.get(timeout=0.05)
            except queue.Empty:
                kind = None
            if kind == "ok":
                results[rank] = pickle.loads(payload)
            elif kind == "error":
                exc_bytes, tb = payload
                err = pickle.loads(exc_bytes)
                err.add_note(f"raised on rank {rank} of {tp} ({backend} backend); its traceback:\n{tb}")
                errors[rank] = err
            now = time.monotonic()
            for rank, p in enumerate(procs):
                if rank in results or rank in errors or p.exitcode is None:
                    continue
                if p.exitcode == 0 and now - exited_at.setdefault(rank, now) < EXIT_GRACE_S:
                    continue  # exited normally: its result may still be in the queue
                how = ("exited with code 0 without returning a result or an error (os._exit or sys.exit in the "
                       "rank program?)" if p.exitcode == 0 else f"died: {_exit_reason(p.exitcode)}")
                errors[rank] = RankDiedError(f"rank {rank} of {tp} (pid {p.pid}) {how}; the other ranks were stopped")
            if errors:
                first_error_at = first_error_at or now
                # A peer's connection error often arrives before the cause: wait briefly for it.
                if any(not isinstance(e, PeerFailure) for e in errors.values()) or now - first_error_at > 2.0:
                    break
            elif stalled := progress.stalled(sorted(set(range(tp)) - set(results)), timeout):
                raise CollectiveTimeout(f"{stalled}; every rank was stopped")
    finally:
        if errors or len(results) < tp:
            _stop(procs)
        else:
            for p in procs:
                p.join()
        for name in shm_names.values():
            shm.remove(name)  # already gone unless a group's rank 0 died between creating and removing it
        shutil.rmtree(rendezvous, ignore_errors=True)
        launcher_alive.close()
        alive_writer.close()
    if errors and results and all(isinstance(e, PeerFailure) for e in errors.values()):
        raise CollectiveTimeout(f"ranks {sorted(errors)} were in a collective that ranks {sorted(results)} "
                                "returned without joining: every rank must call the same collectives in the same order")
    if errors:
        rank, err = first_error(errors)
        silent = sorted(set(range(tp)) - set(results) - set(errors))
        if isinstance(err, CollectiveTimeout) and silent:
            raise CollectiveTimeout(f"rank(s) {silent} of {tp} never joined the collective that rank {rank} waited "
                                    f"{timeout:g} s in [{progress.states(silent)}]; every rank was stopped") from err
        if others := progress.others(rank):
            err.add_note(f"the other ranks: {others}")
        raise err
    return [results[r] for r in range(tp)]


