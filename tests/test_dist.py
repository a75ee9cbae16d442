"""Dist: every collective's result on threads and gloo, exact counts and bytes in
``dist.stats``, the threads backend's fixed rank-order reduction, and CommStats."""
from __future__ import annotations

import pytest
import torch

from tplab import CommStats, launch

SHAPE = (24, 24)  # both dims divisible by every tp tested


def rank_input(rank: int) -> torch.Tensor:
    """Rank r's tensor: different on every rank, reproducible in the test process."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1000 + rank))


# --- rank programs -------------------------------------------------------------
def every_collective(dist) -> dict:
    """Call each collective once (plus a ring of send/recv) and return the results and the stats."""
    n, rank = dist.world_size, dist.rank
    x = rank_input(rank)
    out = {
        "all_reduce": dist.all_reduce(x.clone()),
        "all_gather_last": dist.all_gather(x, dim=-1),
        "all_gather_first": dist.all_gather(x, dim=0),
    }
    before = x.clone()
    out["reduce_scatter_last"] = dist.reduce_scatter(x, dim=-1)
    out["reduce_scatter_first"] = dist.reduce_scatter(x, dim=0)
    out["reduce_scatter_kept_input"] = torch.equal(x, before)
    out["broadcast"] = dist.broadcast(x.clone() if rank == n - 1 else torch.zeros(SHAPE), src=n - 1)
    if n > 1:  # a ring: rank r sends to r+1; even ranks send first so blocking sends cannot deadlock
        right, left, buffer = (rank + 1) % n, (rank - 1) % n, torch.empty(SHAPE)
        if rank % 2 == 0:
            dist.send(x, right)
            out["recv"] = dist.recv(buffer, left)
        else:
            out["recv"] = dist.recv(buffer, left)
            dist.send(x, right)
    dist.barrier()
    out["counts"] = dist.stats.counts()
    out["bytes"] = {op: dist.stats.total_bytes(op) for op in out["counts"]}
    out["all_timed"] = all(r.seconds > 0 for r in dist.stats.records)
    out["records"] = [(r.op, r.shape, r.dtype) for r in dist.stats.records]
    return out


def mismatched_shapes(dist):
    return dist.all_reduce(torch.ones(dist.rank + 1))


def reduce_scatter_indivisible(dist):
    return dist.reduce_scatter(torch.ones(4, 5), dim=-1)


# --- tests -------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["threads", "gloo"])
@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8])
def test_every_collective_and_its_record(tp, backend):
    xs = [rank_input(r) for r in range(tp)]
    total = xs[0].clone()
    for x in xs[1:]:
        total += x  # rank order 0, 1, ..., n-1
    out = launch(every_collective, tp, backend)
    exact = torch.equal if backend == "threads" else lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    for rank, o in enumerate(out):
        # threads reduce in fixed rank order: bitwise the sequential sum, on every rank
        assert exact(o["all_reduce"], total)
        assert torch.equal(o["all_reduce"], out[0]["all_reduce"])
        assert torch.equal(o["all_gather_last"], torch.cat(xs, dim=-1))
        assert torch.equal(o["all_gather_first"], torch.cat(xs, dim=0))
        assert exact(o["reduce_scatter_last"], total.chunk(tp, dim=-1)[rank])
        assert exact(o["reduce_scatter_first"], total.chunk(tp, dim=0)[rank])
        assert o["reduce_scatter_kept_input"]
        assert torch.equal(o["broadcast"], xs[tp - 1])
        if tp > 1:
            assert torch.equal(o["recv"], xs[(rank - 1) % tp])

        nbytes = 24 * 24 * 4
        p2p = {"send": 1, "recv": 1} if tp > 1 else {}
        assert o["counts"] == {"all_reduce": 1, "all_gather": 2, "reduce_scatter": 2, "broadcast": 1, **p2p}
        assert o["bytes"] == {"all_reduce": nbytes, "all_gather": 2 * tp * nbytes, "reduce_scatter": 2 * nbytes,
                              "broadcast": nbytes, **{op: nbytes for op in p2p}}
        assert o["records"][0] == ("all_reduce", SHAPE, "float32")
        assert o["all_timed"]


def test_threads_results_are_deterministic():
    first, second = (launch(every_collective, 4) for _ in range(2))
    assert all(torch.equal(a["all_reduce"], b["all_reduce"]) for a, b in zip(first, second))


def test_mismatched_shapes_are_reported_on_threads():
    with pytest.raises(ValueError, match="different shapes or dtypes"):
        launch(mismatched_shapes, 2)


def test_reduce_scatter_of_an_indivisible_dim_is_rejected_before_communicating():
    with pytest.raises(ValueError, match="size 5 of dim -1 is not divisible by world_size=3"):
        launch(reduce_scatter_indivisible, 3)


def test_comm_stats_counts_sums_tags_and_resets():
    stats = CommStats()
    stats.record("all_reduce", (2, 8), "float32", 64, 0.5)
    stats.tag = "decode"
    stats.record("all_reduce", (1, 8), "float32", 32, 0.25)
    stats.record("all_gather", (1, 8), "float32", 64, 0.125)
    assert stats.count() == 3 and stats.count("all_reduce") == 2 and stats.count(tag="decode") == 2
    assert stats.count("all_reduce", tag="decode") == 1 and stats.count(tag="prefill") == 0
    assert stats.total_bytes() == 160 and stats.total_bytes("all_reduce") == 96
    assert stats.total_seconds("all_reduce") == 0.75
    assert stats.counts() == {"all_reduce": 2, "all_gather": 1}
    assert stats.counts(tag="") == {"all_reduce": 1}
    assert stats.summary(tag="decode") == {"all_reduce": {"count": 1, "bytes": 32, "seconds": 0.25},
                                           "all_gather": {"count": 1, "bytes": 64, "seconds": 0.125}}
    assert [r.tag for r in stats.records] == ["", "decode", "decode"]
    stats.reset()
    assert stats.count() == 0 and stats.summary() == {}
