"""The tp x pp grid: each rank's groups, sub-group collectives, send/recv between stages and all_to_all, on thread
ranks, gloo processes (shared memory and TCP) and torchrun, bit for bit alike, with exact counts per group."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from grid_probe import grid_exchanges  # a module of this folder, importable by every rank
from torchrun_helpers import run_under_torchrun, stdout_or_raise

from tplab import launch
from tplab.comm.grid import GridShape

HERE = str(Path(__file__).resolve().parent)


def test_the_grid_numbers_tp_ranks_within_a_stage_and_stages_across():
    shape = GridShape(tp=4, pp=2, ep=2)
    assert shape.world_size == 8 and shape.coords(5) == (1, 1)
    assert shape.groups("tp") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert shape.groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert shape.groups("ep") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert shape.group_of("pp", 6) == (2, [2, 6])


@pytest.mark.parametrize("bad, message", [
    (dict(tp=4, ep=3), "ep=3 does not divide tp=4.*valid ep: 1, 2, 4"),
    (dict(tp=2, pp=0), "pp must be a positive integer, got 0"),
    (dict(tp=2, ep=-1), "ep must be a positive integer"),
])
def test_a_bad_grid_is_refused_before_any_rank_starts(bad, message):
    with pytest.raises(ValueError, match=message):
        GridShape(**bad)
    with pytest.raises(ValueError, match=message):
        launch(grid_exchanges, bad.pop("tp"), **bad)


def check_two_by_two(results: list[dict]) -> None:
    """What the 2 x 2 grid (tp 2, pp 2, ep 2) must give, rank by rank."""
    assert [(r["rank"], r["stage"], r["tp_rank"]) for r in results] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    assert all(r["sizes"] == [2, 2, 2] for r in results)
    assert [r["tp_sum"] for r in results] == [[3.0, 0.5]] * 2 + [[7.0, 2.5]] * 2  # (0+1, 1+2) and (2+3, 3+4)...
    assert [r["pp_sum"] for r in results] == [[4.0], [6.0], [4.0], [6.0]]  # ranks {0, 2} and {1, 3}
    assert [r.get("from_prev_stage") for r in results] == [None, None, [0.25] * 3, [1.25] * 3]
    assert [r.get("token_back") for r in results] == [[102], [103], None, None]
    assert results[0]["a2a_equal"] == [[0.0, 0.0], [10.0, 10.0]] and results[3]["a2a_equal"] == [[21.0] * 2, [31.0] * 2]
    assert [len(c) for c in results[1]["a2a_uneven"]] == [2, 3]  # rank j sent rank 1 a chunk of j + 1 + 1 rows
    assert results[2]["a2a_ep"] == [[2.0], [3.0]]
    counts = results[0]["counts"]
    assert counts["tp"] == {"all_reduce": {"count": 1, "bytes": 8},
                            "all_to_all": {"count": 2, "bytes": 2 * 2 * 4 * 4 + (1 + 2) * 3 * 4}}
    assert counts["pp"] == {"all_reduce": {"count": 1, "bytes": 4}, "send": {"count": 1, "bytes": 24},
                            "recv": {"count": 1, "bytes": 8}}
    assert counts["ep"] == {"all_to_all": {"count": 1, "bytes": 8}}
    assert results[3]["counts"]["pp"] == {"all_reduce": {"count": 1, "bytes": 4}, "recv": {"count": 1, "bytes": 24},
                                          "send": {"count": 1, "bytes": 8}}
    assert all(r["groups"] == ["ep", "pp", "tp"] for r in results)


@pytest.mark.parametrize("backend", ["threads", "gloo", "gloo-tcp"])
def test_a_two_by_two_grid_on_each_backend(backend):
    results = launch(grid_exchanges, 2, backend, pp=2, ep=2, timeout=120)
    check_two_by_two(results)
    if backend != "threads":
        assert results == launch(grid_exchanges, 2, "threads", pp=2, ep=2)  # every bit alike


def test_a_two_by_two_grid_under_torchrun():
    out = stdout_or_raise(run_under_torchrun(4, ["grid_probe", "2", "2", "2"], cwd=HERE, timeout=240))
    check_two_by_two(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("backend", ["gloo", "gloo-tcp"])
def test_all_to_all_of_uneven_splits_equals_thread_ranks_bit_for_bit(backend):
    results = launch(grid_exchanges, 3, backend, pp=1, ep=3, timeout=120)
    assert results == launch(grid_exchanges, 3, "threads", ep=3)
    assert [[len(c) for c in r["a2a_uneven"]] for r in results] == [[1, 2, 3], [2, 3, 4], [3, 4, 5]]
    assert all("from_prev_stage" not in r and r["sizes"] == [3, 1, 3] for r in results)


def test_one_stage_is_tensor_parallelism_alone():
    """pp = ep = 1: the rank program gets the TP group as before; the other groups are groups of one."""
    def program(dist):
        grid = dist.grid
        total = dist.all_reduce(torch.ones(2))
        alone = grid.pp.all_reduce(torch.full((1,), 5.0))
        return (grid.tp is dist, dist.world_size, grid.pp.world_size, grid.ep.world_size, grid.is_first_stage,
                grid.is_last_stage, grid.next_stage, total.tolist(), alone.tolist(), dist.stats.counts(),
                grid.pp.stats.counts())

    assert launch(program, 4) == [(True, 4, 1, 1, True, True, None, [4.0, 4.0], [5.0], {"all_reduce": 1},
                                   {"all_reduce": 1})] * 4


def test_a_group_of_one_has_no_peer_to_send_to():
    def program(dist):
        dist.grid.pp.send(torch.ones(1), 0)

    with pytest.raises(ValueError, match="group of one rank"):
        launch(program, 1)


def test_a_failing_rank_in_one_stage_stops_the_other_stage():
    """Rank 3 (stage 1) raises; rank 0 waits in a pipeline recv and rank 1 in a TP all-reduce: all stop at once."""
    def program(dist):
        grid = dist.grid
        if grid.rank == 3:
            raise RuntimeError("stage 1 broke")
        if grid.rank == 0:
            return grid.pp.recv(torch.empty(1), 1)
        return dist.all_reduce(torch.ones(1))

    with pytest.raises(RuntimeError, match="stage 1 broke"):
        launch(program, 2, pp=2, timeout=60)
