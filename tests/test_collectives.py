"""Teaching collectives (naive and ring all-reduce from send/recv), the ring schedule,
the α-β formulas, and the all-reduce benchmark with its least-squares fit."""
from __future__ import annotations

import math

import pytest
import torch

from tplab import launch
from tplab.bench.comm import check_bench_args, fit_alpha_beta, measure_all_reduce
from tplab.comm.collectives import naive_all_reduce, ring_all_reduce, ring_contributions, ring_schedule
from tplab.perf.comm import bus_bandwidth, naive_all_reduce_seconds, ring_all_gather_seconds, ring_all_reduce_seconds

SHAPES = [(1,), (3,), (7,), (5, 6), (3, 11)]  # none divisible by every tp; (1,) and (3,) smaller than most


def rank_input(rank: int, shape: tuple[int, ...], integers: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(7 * rank + len(shape))
    if integers:  # every summation order gives the same float: results must be bitwise equal
        return torch.randint(-50, 50, shape, generator=g).float()
    return torch.randn(shape, generator=g)


# --- rank program ------------------------------------------------------------------
def three_all_reduces(dist, shapes, integers):
    """For each shape: naive, ring and Dist.all_reduce of this rank's input, with each one's record."""
    out = []
    for shape in shapes:
        x = rank_input(dist.rank, shape, integers)
        row = {}
        for name, algorithm in (("naive", naive_all_reduce), ("ring", ring_all_reduce),
                                ("builtin", lambda d, t: d.all_reduce(t.clone()))):
            dist.stats.reset()
            row[name] = algorithm(dist, x)
            row[name + "_stats"] = dist.stats.summary()
        row["input_kept"] = torch.equal(x, rank_input(dist.rank, shape, integers))
        out.append(row)
    return out


def _check(out, tp, integers, backend):
    for i, shape in enumerate(SHAPES):
        nbytes = math.prod(shape) * 4
        total = sum(rank_input(r, shape, integers) for r in range(tp))
        for rank, rows in enumerate(out):
            row = rows[i]
            assert row["input_kept"]
            assert torch.equal(row["builtin"], out[0][i]["builtin"])
            if integers:
                assert torch.equal(row["naive"], total) and torch.equal(row["ring"], total)
            else:  # ring adds in another order than rank order: rounding differs
                torch.testing.assert_close(row["ring"], row["builtin"], rtol=1e-6, atol=1e-6)
                if backend == "threads":  # naive adds in rank order, like the threads backend
                    assert torch.equal(row["naive"], row["builtin"])
            assert list(row["builtin_stats"]) == ["all_reduce"]
            assert row["builtin_stats"]["all_reduce"]["count"] == 1
            assert row["builtin_stats"]["all_reduce"]["bytes"] == nbytes
            naive, ring = row["naive_stats"], row["ring_stats"]
            if tp == 1:
                assert naive == {} and ring == {}
                continue
            messages = tp - 1 if rank == 0 else 1
            assert naive["send"]["count"] == naive["recv"]["count"] == messages
            assert naive["send"]["bytes"] == messages * nbytes
            assert ring["send"]["count"] == ring["recv"]["count"] == 2 * (tp - 1)
            chunk = torch.tensor_split(torch.empty(math.prod(shape)), tp)
            sent = [chunk[t.chunk].numel() * 4 for step in ring_schedule(tp) for t in step if t.src == rank]
            assert ring["send"]["bytes"] == sum(sent) <= 2 * (tp - 1) * math.ceil(math.prod(shape) / tp) * 4


@pytest.mark.parametrize("tp", range(1, 9))
def test_naive_and_ring_equal_all_reduce_on_threads(tp):
    for integers in (True, False):
        _check(launch(three_all_reduces, tp, "threads", args=(SHAPES, integers)), tp, integers, "threads")


@pytest.mark.parametrize("tp", [2, 3, 5, 8])
def test_naive_and_ring_equal_all_reduce_on_gloo(tp):
    _check(launch(three_all_reduces, tp, "gloo", args=(SHAPES, True)), tp, True, "gloo")


# --- the ring schedule ------------------------------------------------------------------
@pytest.mark.parametrize("n", range(1, 9))
def test_ring_schedule_is_a_ring_and_ends_with_every_sum_everywhere(n):
    steps = ring_schedule(n)
    assert len(steps) == 2 * (n - 1)
    for step in steps:
        assert sorted(t.src for t in step) == sorted(t.dst for t in step) == list(range(n))
        assert all(t.dst == (t.src + 1) % n for t in step)
    history = ring_contributions(n)
    everyone = frozenset(range(n))
    after_reduce_scatter = history[n - 1]
    for r in range(n):  # rank r holds the complete sum of chunk r+1 after reduce-scatter
        assert after_reduce_scatter[r][(r + 1) % n] == everyone
    assert all(chunk == everyone for rank in history[-1] for chunk in rank)
    for before, step in zip(history, steps[:n - 1]):  # reduce-scatter never adds a rank's data twice
        assert all(not before[t.src][t.chunk] & before[t.dst][t.chunk] for t in step)


# --- the α-β formulas ---------------------------------------------------------------------
def test_alpha_beta_formulas():
    alpha, beta, size = 1e-5, 1e9, 8e6
    assert naive_all_reduce_seconds(size, 4, alpha, beta) == pytest.approx(6 * (1e-5 + 8e-3))
    assert ring_all_reduce_seconds(size, 4, alpha, beta) == pytest.approx(6 * (1e-5 + 2e-3))
    assert ring_all_gather_seconds(size, 4, alpha, beta) == pytest.approx(3 * (1e-5 + 2e-3))
    assert ring_all_reduce_seconds(size, 1, alpha, beta) == naive_all_reduce_seconds(size, 1, alpha, beta) == 0
    for n in range(2, 9):  # the ring never loses; for large S it tends to 2S/β whatever n
        assert ring_all_reduce_seconds(size, n, alpha, beta) <= naive_all_reduce_seconds(size, n, alpha, beta)
        assert ring_all_reduce_seconds(1e12, n, 0, beta) == pytest.approx(2e12 / beta * (n - 1) / n)
    assert bus_bandwidth(size, 1e-3, 4) == pytest.approx(8e9 * 1.5)
    assert bus_bandwidth(size, 1e-3, 4, "all_gather") == pytest.approx(8e9 * 0.75)


# --- the benchmark and its fit ---------------------------------------------------------------
def test_fit_recovers_alpha_and_beta_from_model_times():
    sizes = [4 ** k for k in range(1, 12)]
    for n, alpha, beta in ((2, 3e-5, 2e9), (4, 1e-6, 5e10)):
        times = [ring_all_reduce_seconds(s, n, alpha, beta) for s in sizes]
        fitted = fit_alpha_beta(sizes, times, n)
        assert fitted == pytest.approx((alpha, beta), rel=1e-9)
        noisy = [t * (1.05 if i % 2 else 0.95) for i, t in enumerate(times)]
        assert fit_alpha_beta(sizes, noisy, n) == pytest.approx((alpha, beta), rel=0.1)
    # latency-free data: alpha clamps to 0 instead of going negative
    assert fit_alpha_beta([1e3, 1e6], [ring_all_reduce_seconds(s, 2, 0, 1e9) * 0.99 for s in (1e3, 1e6)], 2)[0] >= 0


def test_fit_and_benchmark_reject_bad_input():
    with pytest.raises(ValueError, match="n >= 2"):
        fit_alpha_beta([4, 8], [1.0, 2.0], 1)
    with pytest.raises(ValueError, match="at least 2 different sizes"):
        fit_alpha_beta([4, 4], [1.0, 2.0], 2)
    with pytest.raises(ValueError, match="do not grow with message size"):
        fit_alpha_beta([4, 4096], [2.0, 1.0], 2)
    with pytest.raises(ValueError, match=r"multiples of 4 bytes.*\[6, 0\]"):
        check_bench_args([4, 6, 0], warmup=1, repeats=1)
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_all_reduce([4], 2, "gloo", repeats=0)  # rejected before launching


@pytest.mark.parametrize("backend", ["threads", "gloo"])
def test_measure_all_reduce_returns_a_positive_time_per_size(backend):
    sizes = [4, 4096, 1 << 20]
    seconds = measure_all_reduce(sizes, 2, backend, warmup=1, repeats=3)
    assert len(seconds) == 3 and all(s > 0 for s in seconds)


def test_comm_bench_command_prints_measured_rows_and_the_fit(capsys):
    from tplab.cli import main
    assert main(["comm-bench", "--tp", "2", "--backend", "threads", "--sizes", "4,4194304", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0].isdigit()]
    assert [r[0] for r in rows] == ["4", "4194304"] and all(float(r[1]) > 0 for r in rows)
    assert "fitted to these measurements: α =" in out
    assert main(["comm-bench", "--sizes", "6"]) == 2
    assert "multiples of 4 bytes" in capsys.readouterr().err
