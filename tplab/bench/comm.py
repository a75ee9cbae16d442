"""Measure all-reduce latency and bandwidth, and fit the α-β model to the measurements.

* :func:`time_all_reduce` is a rank program. For each message size S (bytes)
  it all-reduces a float32 tensor of S/4 elements ``warmup`` times untimed,
  then ``repeats`` times, each after a barrier so that every rank starts
  together, and returns this rank's median seconds per size. The times are
  the ones :class:`~tplab.comm.Dist` records in ``dist.stats`` (tagged
  ``"bench:<size>"``), so the benchmark measures exactly what tplab's layers pay.
* :func:`measure_all_reduce` launches it and keeps, per size, the slowest
  rank's median (a collective is finished when its last rank is).
* :func:`fit_alpha_beta` fits the ring all-reduce formula
  T(S) = 2(n-1)(α + S/(nβ)) to measured (S, T) pairs by least squares on the
  relative error. The result is a *fitted* model: the backend's own algorithm
  need not be a ring, so α and β are the effective latency and bandwidth that
  make the ring formula match these measurements.

Bandwidths follow nccl-tests: algbw = S/T, busbw = algbw * 2(n-1)/n
(:func:`tplab.perf.comm.bus_bandwidth`).
"""
from __future__ import annotations

import statistics

import numpy as np
import torch

from tplab.checks import is_positive_int
from tplab.comm.group import Dist
from tplab.comm.launch import launch

FLOAT32_BYTES = 4


def check_bench_args(sizes_bytes: list[int], warmup: int, repeats: int) -> None:
    """Reject sizes that are not positive multiples of 4 bytes (one float32), or no repeats."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    if not sizes_bytes:
        raise ValueError("give at least one message size in bytes")
    bad = [s for s in sizes_bytes if not is_positive_int(s, FLOAT32_BYTES)
           or s % FLOAT32_BYTES]
    if bad:
        raise ValueError(f"message sizes must be positive multiples of {FLOAT32_BYTES} bytes (float32), got {bad}")


def time_all_reduce(dist: Dist, sizes_bytes: list[int], warmup: int = 3, repeats: int = 10) -> list[float]:
    """Rank program: this rank's median all-reduce seconds for each size in ``sizes_bytes``."""
    check_bench_args(sizes_bytes, warmup, repeats)
    medians = []
    for size in sizes_bytes:
        x = torch.zeros(size // FLOAT32_BYTES, device=dist.device)  # stays 0 however often it is summed
        dist.stats.tag = "bench:warmup"
        for _ in range(warmup):
            dist.all_reduce(x)
        tag = dist.stats.tag = f"bench:{size}"
        for _ in range(repeats):
            dist.barrier()
            dist.all_reduce(x)
        medians.append(statistics.median(r.seconds for r in dist.stats.records if r.tag == tag))
    dist.stats.tag = ""
    return medians


def measure_all_reduce(sizes_bytes: list[int], tp: int, backend: str = "gloo", warmup: int = 3,
                       repeats: int = 10, timeout: float = 300.0) -> list[float]:
    """Median all-reduce seconds per size on ``tp`` ranks: per size, the slowest rank's median."""
    check_bench_args(sizes_bytes, warmup, repeats)
    per_rank = launch(time_all_reduce, tp, backend, timeout=timeout, args=(list(sizes_bytes), warmup, repeats))
    return [max(times) for times in zip(*per_rank)]


def fit_alpha_beta(sizes_bytes: list[float], seconds: list[float], n: int) -> tuple[float, float]:
    """(α seconds, β bytes/s) of the ring formula T(S) = 2(n-1)(α + S/(nβ)), fitted to measurements.

    T is linear in (α, 1/β): T = α·2(n-1) + (1/β)·2(n-1)S/n. Each equation is
    divided by its measured T, so the least-squares fit weighs the relative
    error of small and large messages alike. α is kept >= 0 (refitting 1/β
    alone if the free fit makes it negative).
    """
    if n < 2:
        raise ValueError(f"the α-β model needs n >= 2 ranks (n=1 moves no data), got n={n}")
    if len(sizes_bytes) != len(seconds) or len(set(sizes_bytes)) < 2:
        raise ValueError("need matching sizes and seconds with at least 2 different sizes")
    if min(seconds) <= 0:
        raise ValueError(f"measured seconds must be positive, got {min(seconds)}")
    size, t = np.asarray(sizes_bytes, dtype=float), np.asarray(seconds, dtype=float)
    columns = np.stack([np.full_like(size, 2 * (n - 1)), 2 * (n - 1) * size / n], axis=1) / t[:, None]
    ones = np.ones_like(t)
    (alpha, inv_beta), *_ = np.linalg.lstsq(columns, ones, rcond=None)
    if alpha < 0:
        alpha = 0.0
        inv_beta = float(columns[:, 1] @ ones / (columns[:, 1] @ columns[:, 1]))
    if inv_beta <= 0:
        raise ValueError("the measured times do not grow with message size (noise is larger than the differences), "
                         "so no α + S/β fits them: measure larger --sizes")
    return float(alpha), float(1 / inv_beta)
