"""The command line and torchrun: the demo on every backend, and a failing rank under torchrun that stops the
group with torchrun naming its error."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import failing_rank
from torchrun_helpers import env_outside_torchrun, run_under_torchrun, stdout_or_raise

from tplab.comm.torchrun import report_errors_to_torchrun

BACKENDS = ("threads", "gloo")
REPO = str(Path(__file__).resolve().parent.parent)
HERE = str(Path(__file__).resolve().parent)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, timeout=240, capture_output=True, text=True, env=env_outside_torchrun(), cwd=REPO)


def rank_program(dist):
    return dist.rank


def test_demo_runs_and_matches_the_dense_mlp():
    out = stdout_or_raise(_run([sys.executable, "-m", "tplab", "demo"]))
    rows = [line.split() for line in out.splitlines() if line.startswith(("threads", "gloo"))]
    assert [(r[0], r[1]) for r in rows] == [(b, t) for b in BACKENDS for t in ("1", "2", "4")]
    assert all(r[-3] == "1" for r in rows), "one all-reduce per MLP"


def test_demo_under_torchrun_uses_the_torchrun_processes():
    done = run_under_torchrun(2, ["tplab", "demo", "--tp", "2", "--backend", "threads"],
                              cwd=REPO)
    out = stdout_or_raise(done)
    rows = [line.split() for line in out.splitlines() if line.startswith("torchrun")]
    assert len(rows) == 1, out  # both processes computed it; only rank 0 prints
    assert all(r[1] == "2" and r[-3] == "1" for r in rows)


def test_under_torchrun_a_failing_rank_stops_the_group_and_torchrun_names_its_error():
    """Rank 1 raises while rank 0 waits in an all-reduce: torchrun ends both, and its root cause is rank 1's error."""
    start = time.monotonic()
    done = run_under_torchrun(2, ["failing_rank"], timeout=120, cwd=HERE)
    assert done.returncode != 0 and time.monotonic() - start < 60, done.stderr[-2000:]
    root_cause = done.stderr[done.stderr.index("Root Cause"):]
    assert "rank      : 1" in root_cause and f"RuntimeError: {failing_rank.MESSAGE}" in root_cause, root_cause


def test_report_errors_to_torchrun_changes_nothing_outside_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert report_errors_to_torchrun(rank_program) is rank_program
