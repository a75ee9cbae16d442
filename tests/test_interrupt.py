"""Ctrl-C: every rank stops, one line is printed, the exit status is 130, and nothing is left behind."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STARTUP_S = 8.0  # torch imported and the ranks serving, even on a busy 2-core machine


@pytest.fixture
def started():
    """Start a command in a session (process group) of its own; the group is killed at the end, whatever happened, so
    that a failed test leaves no command serving on."""
    procs = []

    def start(*argv: str) -> subprocess.Popen:
        procs.append(subprocess.Popen([sys.executable, "-m", "tplab", *argv], cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))
        return procs[-1]
    yield start
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()


def _tplab_segments() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("tplab-*")} if shm.is_dir() else set()


@pytest.mark.parametrize("backend", ["threads", "gloo"])
def test_ctrl_c_stops_every_rank_prints_one_line_and_exits_130(backend, tmp_path, started):
    before = _tplab_segments()
    # a terminal's Ctrl-C signals the whole foreground process group: the command, its rank processes and the
    # forkserver; a session of its own gives the test that group
    proc = started("serve-bench", "--tp", "2", "--backend", backend, "--num-requests", "20000", "--out", str(tmp_path))
    time.sleep(STARTUP_S)
    assert proc.poll() is None, proc.communicate()
    interrupted_at = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - interrupted_at < 15
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted: tplab serve-bench stopped every rank; nothing was recorded"]
    assert out == "" and not any(tmp_path.rglob("*.jsonl"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the rank processes and the forkserver end with the command
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"processes of the interrupted {backend} run are still alive")
    assert _tplab_segments() <= before


def test_ctrl_c_while_the_command_starts_prints_one_line_and_exits_130(started):
    """torch takes seconds to import, and libraries catch a KeyboardInterrupt mid-import or re-raise it as another
    error: the entry point holds a Ctrl-C until its imports are done, then answers it like any other."""
    proc = started("generate", "--tp", "2")
    time.sleep(0.5)  # importing torch
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted: tplab stopped before any rank started; nothing was recorded"]
    assert out == ""


def test_an_error_raised_from_a_ctrl_c_counts_as_one():
    """transformers' lazy imports re-raise a KeyboardInterrupt as ModuleNotFoundError ``from`` it."""
    from tplab.cli import interrupted
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise ModuleNotFoundError("Could not import module 'LlamaConfig'") from e
    except ModuleNotFoundError as e:
        assert interrupted(e)
    assert not interrupted(ValueError("a bad flag")) and interrupted(KeyboardInterrupt())
