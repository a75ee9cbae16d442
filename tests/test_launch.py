"""launch: results in rank order on every backend, clear errors for bad arguments,
and failure that is never a hang (a rank that raises, dies, or skips a collective).

The rank programs are top-level functions of this module so that gloo processes
can import them.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import psutil
import pytest
import torch

from tplab import CollectiveTimeout, RankDiedError, launch

BACKENDS = ("threads", "gloo", "gloo-tcp")  # gloo: collectives through shared memory; gloo-tcp: plain gloo
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def no_shared_memory_is_left_behind():
    """Whatever a launch did (a rank raised, died, hung), no tplab segment stays in /dev/shm."""
    before = tplab_segments()
    yield
    assert tplab_segments() - before == set()


def tplab_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("tplab-")} if os.path.isdir("/dev/shm") else set()


# --- rank programs -------------------------------------------------------------
def identify(dist, offset, scale=1):
    """Who am I: checks that args and kwargs arrive and results come back in rank order."""
    return {"rank": dist.rank, "world_size": dist.world_size, "device": str(dist.device),
            "value": offset + scale * dist.rank, "pid": os.getpid()}


def _record_pid(pid_dir: str | None, rank: int) -> None:
    if pid_dir:
        with open(os.path.join(pid_dir, f"rank{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))


def raise_on_rank_1(dist, pid_dir=None):
    """Rank 1 raises between two all-reduces; the others are left waiting in the second one."""
    _record_pid(pid_dir, dist.rank)
    dist.all_reduce(torch.ones(4))
    if dist.rank == 1:
        raise KeyError("rank 1 gave up")
    dist.all_reduce(torch.ones(4))
    return dist.rank


def killed_mid_collective(dist, pid_dir):
    """Rank 1 is SIGKILLed while blocked in an all-reduce that rank 0 (asleep) has not joined."""
    _record_pid(pid_dir, dist.rank)
    if dist.rank == 0:
        time.sleep(120)
    if dist.rank == 1:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGKILL)).start()
    return dist.all_reduce(torch.ones(4))


def rank_1_returns_early(dist):
    """Rank 1 returns without joining the all-reduce that the others wait in."""
    if dist.rank == 1:
        return "left early"
    return dist.all_reduce(torch.ones(4))


def rank_1_busy(dist, seconds):
    """Rank 1 is busy for ``seconds`` (longer than the timeout) before joining."""
    if dist.rank == 1:
        time.sleep(seconds)
    return dist.all_reduce(torch.ones(4))


def rank_1_exits(dist):
    """Rank 1's process ends with exit code 0 and no result; rank 0 waits for it in an all-reduce."""
    if dist.rank == 1:
        os._exit(0)
    return dist.all_reduce(torch.ones(4))


def rank_1_busy_after_the_others_returned(dist, seconds):
    """Rank 1 computes for ``seconds`` and calls no collective; the others return at once."""
    if dist.rank == 1:
        time.sleep(seconds)
    return dist.rank


def sleep_a_long_time(dist, pid_dir):
    """Every rank records its pid, then sleeps far longer than any test."""
    _record_pid(pid_dir, dist.rank)
    time.sleep(300)


# --- helpers ---------------------------------------------------------------------
def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _assert_ranks_stopped(pid_dir) -> None:
    pids = [int(p.read_text()) for p in pid_dir.iterdir()]
    assert pids, "the rank programs did not start"
    deadline = time.monotonic() + 5
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(p) for p in pids), f"rank processes still running: {[p for p in pids if not _gone(p)]}"


# --- results and arguments -----------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_results_come_back_in_rank_order_with_args_and_kwargs(backend):
    out = launch(identify, 4, backend, args=(10,), kwargs={"scale": 100})
    assert [o["rank"] for o in out] == [0, 1, 2, 3]
    assert [o["value"] for o in out] == [10, 110, 210, 310]
    assert {o["world_size"] for o in out} == {4}
    assert {o["device"] for o in out} == {"cpu"}
    pids = {o["pid"] for o in out}
    if backend == "threads":
        assert pids == {os.getpid()}
    else:
        assert len(pids) == 4 and os.getpid() not in pids


@pytest.mark.parametrize("tp", [0, -1, 1.5, True, "2", None])
def test_tp_must_be_a_positive_integer(tp):
    with pytest.raises(ValueError, match="tp must be a positive integer"):
        launch(identify, tp, args=(0,))


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown backend 'nccl'; choose one of \('threads', 'gloo', 'gloo-tcp'\).*torchrun"):
        launch(identify, 2, "nccl", args=(0,))


@pytest.mark.parametrize("timeout", [0, -5])
def test_timeout_must_be_positive(timeout):
    with pytest.raises(ValueError, match="timeout must be > 0"):
        launch(identify, 2, timeout=timeout, args=(0,))


def test_gloo_rejects_an_unpicklable_function():
    with pytest.raises(TypeError, match="cannot be pickled.*backend='threads'"):
        launch(lambda dist: dist.rank, 2, "gloo")


def test_gloo_rejects_a_function_defined_in_a_notebook(monkeypatch):
    notebook_main = types.ModuleType("__main__")  # a kernel's __main__ has no __file__

    def rank_program(dist):
        return dist.rank
    rank_program.__module__, rank_program.__qualname__ = "__main__", "rank_program"
    notebook_main.rank_program = rank_program
    monkeypatch.setitem(sys.modules, "__main__", notebook_main)
    with pytest.raises(TypeError, match="rank_program is defined in a notebook or REPL.*backend='threads'"):
        launch(rank_program, 2, "gloo")


def test_thread_ranks_share_the_device_they_are_given():
    assert {o["device"] for o in launch(identify, 2, device="cpu", args=(0,))} == {"cpu"}
    if torch.cuda.is_available():  # the GPU case proper is in test_gpu.py
        assert {o["device"] for o in launch(identify, 2, device="cuda", args=(0,))} == {"cuda:0"}
    else:
        with pytest.raises(ValueError, match="no CUDA device is visible: use device='cpu'"):
            launch(identify, 2, device="cuda", args=(0,))


@pytest.mark.parametrize("device, message", [("mps", "thread ranks run on 'cpu' or 'cuda', not 'mps'"),
                                             ("cuda:99", "does not exist|no CUDA device is visible")])
def test_thread_ranks_refuse_a_device_they_cannot_use(device, message):
    with pytest.raises(ValueError, match=message):
        launch(identify, 2, device=device, args=(0,))


def test_gloo_ranks_compute_on_the_cpu_only():
    with pytest.raises(ValueError, match="backend='gloo' runs its ranks on the CPU.*backend='threads'.*torchrun"):
        launch(identify, 2, "gloo", device="cuda", args=(0,))


def cores_and_threads(dist) -> tuple[list[int], int]:
    return sorted(os.sched_getaffinity(0)), torch.get_num_threads()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores and the affinity calls (Linux)")
def test_gloo_ranks_are_bound_to_cores_of_their_own_when_they_fit():
    allowed = sorted(os.sched_getaffinity(0))
    results = launch(cores_and_threads, 2, "gloo")
    threads = results[0][1]
    assert [cores for cores, _ in results] == [allowed[:threads], allowed[threads:2 * threads]]
    crowded = launch(cores_and_threads, len(allowed) + 1, "gloo", threads=1)  # more ranks than cores: left alone
    assert all(cores == allowed for cores, _ in crowded)


def test_under_torchrun_the_device_is_torchrun_s(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="under torchrun each process takes its own device"):
        launch(identify, 2, device="cuda", args=(0,))


def test_tp_must_match_the_torchrun_world_size(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="tp=4 but torchrun started WORLD_SIZE=2.*--nproc-per-node 4"):
        launch(identify, 4, args=(0,))


# --- failures: never a hang ---------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rank_that_raises_is_re_raised_and_the_others_stop(backend, tmp_path):
    start = time.monotonic()
    with pytest.raises(KeyError, match="rank 1 gave up") as info:
        launch(raise_on_rank_1, 3, backend, timeout=60, kwargs={"pid_dir": str(tmp_path)})
    assert time.monotonic() - start < 30
    assert any(f"raised on rank 1 of 3 ({backend} backend)" in note for note in info.value.__notes__)
    if backend.startswith("gloo"):
        assert "in raise_on_rank_1" in "".join(info.value.__notes__)  # the rank's own traceback
        _assert_ranks_stopped(tmp_path)


@pytest.mark.parametrize("backend", ["gloo", "gloo-tcp"])
def test_a_gloo_rank_killed_mid_collective_raises_rank_died_and_the_others_stop(backend, tmp_path):
    start = time.monotonic()
    with pytest.raises(RankDiedError, match="rank 1 of 3 .* died: killed by signal SIGKILL"):
        launch(killed_mid_collective, 3, backend, timeout=60, args=(str(tmp_path),))
    assert time.monotonic() - start < 30  # rank 0 would sleep 120 s: it was stopped
    _assert_ranks_stopped(tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rank_that_returns_without_joining_a_collective_is_detected_at_once(backend):
    start = time.monotonic()
    with pytest.raises(CollectiveTimeout, match=r"\[1\].*returned without joining"):
        launch(rank_1_returns_early, 3, backend, timeout=60)
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rank_stuck_outside_a_collective_is_named_within_the_timeout(backend):
    start = time.monotonic()
    with pytest.raises(CollectiveTimeout, match=r"\[1\]") as info:
        launch(rank_1_busy, 2, backend, timeout=2.0, args=(1000,))
    assert time.monotonic() - start < 8  # the timeout bounds the launch, though rank 1 would sleep 1000 s
    if backend == "threads":
        assert "rank 0 waited more than 2 s in a collective for rank(s) [1], which never joined it" in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rank_busy_after_the_others_returned_is_named_within_the_timeout(backend):
    start = time.monotonic()
    with pytest.raises(CollectiveTimeout, match=r"\[1\]"):
        launch(rank_1_busy_after_the_others_returned, 3, backend, timeout=2.0, args=(1000,))
    assert time.monotonic() - start < 8


def test_a_gloo_rank_that_exits_without_a_result_is_reported_at_once():
    start = time.monotonic()
    with pytest.raises(RankDiedError, match="rank 1 of 2 .* exited with code 0 without returning a result"):
        launch(rank_1_exits, 2, "gloo", timeout=60)
    assert time.monotonic() - start < 5


def test_launch_refuses_what_is_not_a_rank_program():
    with pytest.raises(TypeError, match="got 5, which is not callable"):
        launch(5, 2, "gloo")


def test_a_gloo_script_without_a_main_guard_is_told_what_to_add(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text("import tplab\n\ndef fn(dist):\n    return dist.rank\n\nprint(tplab.launch(fn, 2, 'gloo'))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "without an `if __name__ == \"__main__\":` block" in done.stderr
    assert done.stderr.count("Traceback") == 1  # the parent's own, not one per rank process
    guarded = tmp_path / "guarded.py"
    guarded.write_text(script.read_text().replace("print(", "if __name__ == '__main__':\n    print("))
    done = subprocess.run([sys.executable, str(guarded)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[0, 1]", done.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="a rank ends with its parent where Linux's prctl can ask for it")
def test_gloo_ranks_end_when_their_launcher_is_killed_outright(tmp_path):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    script = tmp_path / "launcher.py"
    script.write_text("from test_launch import sleep_a_long_time\nfrom tplab import launch\n\n"
                      f"if __name__ == '__main__':\n    launch(sleep_a_long_time, 2, 'gloo', args=({str(pid_dir)!r},))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    launcher = subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list(pid_dir.iterdir())) < 2 and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.1)
    launcher.kill()  # SIGKILL: no atexit, no finally
    launcher.wait()
    _assert_ranks_stopped(pid_dir)


def test_a_failed_gloo_rendezvous_is_retried_once_with_a_new_store(monkeypatch, tmp_path):
    from tplab.comm import gloo as launch_gloo
    files = iter([str(tmp_path), None])  # the first store cannot be created: its path is a folder
    real = launch_gloo.rendezvous_file
    monkeypatch.setattr(launch_gloo, "rendezvous_file", lambda folder: next(files) or real(folder))
    start = time.monotonic()
    assert [r["value"] for r in launch(identify, 2, "gloo", timeout=20, args=(10,))] == [10, 11]
    assert time.monotonic() - start < 15


def listening_addresses(dist) -> list[str]:
    """The local addresses of the TCP sockets this rank's process listens on (/proc/net/tcp and tcp6)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                out.append(fields[1].split(":")[0])
    return out


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's socket tables")
def test_gloo_ranks_accept_connections_from_this_host_only():
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1, as /proc writes them
    for addresses in launch(listening_addresses, 2, "gloo-tcp", timeout=60):
        assert addresses and set(addresses) <= loopback, addresses


def every_rank_busy(dist, seconds):
    """Every rank computes for ``seconds`` and calls no collective."""
    time.sleep(seconds)


def rank_0_reduces_rank_1_receives(dist):
    """Rank 0 waits in an all-reduce, rank 1 in a recv from rank 0: neither is outside a collective."""
    if dist.rank == 0:
        return dist.all_reduce(torch.ones(2))
    return dist.recv(torch.empty(2), 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_launch_whose_every_rank_is_stuck_outside_a_collective_ends_within_the_timeout(backend):
    start = time.monotonic()
    with pytest.raises(CollectiveTimeout, match=r"no rank made progress for 2 s: rank\(s\) \[0, 1\] of 2 stayed "
                                                 r"outside any collective.*rank 1: outside any collective for"):
        launch(every_rank_busy, 2, backend, timeout=2.0, args=(1000,))
    assert time.monotonic() - start < 10  # though every rank would sleep 1000 s


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rank_waiting_in_recv_is_named_as_such(backend):
    with pytest.raises(Exception) as info:
        launch(rank_0_reduces_rank_1_receives, 2, backend, timeout=2.0)
    text = "\n".join([str(info.value), *getattr(info.value, "__notes__", [])])
    assert "rank 1: in recv of the tp group" in text or "rank 0: in all_reduce of the tp group" in text, text
    assert "outside any collective" not in text
