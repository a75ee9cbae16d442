"""Figures for collectives: the ring all-reduce step by step, bytes per rank,
and a measured latency/bandwidth sweep against its fitted α-β model."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from tplab.comm.collectives import ring_contributions, ring_schedule
from tplab.perf.comm import bus_bandwidth, naive_all_reduce_seconds, ring_all_reduce_seconds


def _cell_text(ranks: frozenset[int], n: int) -> str:
    return "all" if len(ranks) == n else "+".join(str(r) for r in sorted(ranks))


def _draw_state(ax, state, n: int, received: set[tuple[int, int]], title: str) -> None:
    fill = np.array([[len(chunk) for chunk in rank] for rank in state])
    ax.imshow(fill, cmap="Blues", vmin=0, vmax=n, interpolation="nearest")
    for r in range(n):
        for c in range(n):
            dark = fill[r, c] > n / 2
            ax.text(c, r, _cell_text(state[r][c], n), ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
            if (r, c) in received:
                ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xticks(range(n), [str(c) for c in range(n)])
    ax.set_yticks(range(n), [f"rank {r}" for r in range(n)])
    ax.set_xlabel("chunk")
    ax.set_title(title, fontsize=10)


def plot_ring_all_reduce(n: int) -> Figure:
    """Each rank's n chunks after every step: whose data each chunk sums; red = just received.

    Top row: the reduce-scatter phase (receivers add), bottom row: the
    all-gather phase (receivers copy a finished chunk).
    """
    if n < 2:
        raise ValueError(f"a ring needs n >= 2 ranks, got n={n}")
    history, steps = ring_contributions(n), ring_schedule(n)
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.6), squeeze=False)
    _draw_state(axes[0][0], history[0], n, set(), "start: rank r has x_r")
    axes[1][0].axis("off")
    for i, step in enumerate(steps):
        phase = step[0].phase
        row, col = (0, i + 1) if phase == "reduce_scatter" else (1, i - (n - 1) + 1)
        name = "reduce-scatter" if phase == "reduce_scatter" else "all-gather"
        _draw_state(axes[row][col], history[i + 1], n, {(t.dst, t.chunk) for t in step},
                    f"{name} step {step[0].step + 1}/{n - 1}")
    fig.suptitle(f"Ring all-reduce on {n} ranks: each step every rank sends one chunk to rank+1 (cells list whose "
                 "x is summed in)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_bytes_sent(per_algorithm: dict[str, list[int]]) -> Figure:
    """Bars of bytes each rank sent, one group per algorithm (from ``dist.stats``)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(per_algorithm)
    n = len(per_algorithm[names[0]])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar(np.arange(n) + i * width, per_algorithm[name], width, label=name)
    ax.set_xticks(np.arange(n) + width * (len(names) - 1) / 2, [f"rank {r}" for r in range(n)])
    ax.set_ylabel("bytes sent (from dist.stats)")
    ax.set_title(f"Bytes each rank sends in one all-reduce, {n} ranks")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_all_reduce_sweep(sizes_bytes: list[int], seconds: list[float], n: int, alpha_s: float,
                          beta_bytes_per_s: float, where: str) -> Figure:
    """Measured all-reduce time and bus bandwidth per message size, with the α-β model fitted to them."""
    sizes = np.asarray(sizes_bytes, dtype=float)
    smooth = np.geomspace(sizes.min(), sizes.max(), 200)
    model = np.array([ring_all_reduce_seconds(s, n, alpha_s, beta_bytes_per_s) for s in smooth])
    fit_label = f"α-β model fitted to these points (α={alpha_s * 1e6:.0f} µs, β={beta_bytes_per_s / 1e9:.2f} GB/s)"
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    left.loglog(sizes, np.asarray(seconds) * 1e6, "o", label="measured (median)")
    left.loglog(smooth, model * 1e6, "-", label=fit_label)
    right.semilogx(sizes, [bus_bandwidth(s, t, n) / 1e9 for s, t in zip(sizes, seconds)], "o", label="measured")
    right.semilogx(smooth, [bus_bandwidth(s, t, n) / 1e9 for s, t in zip(smooth, model)], "-", label="fitted α-β model")
    return _finish_sweep(fig, left, right, f"{where}, {n} ranks")


def _finish_sweep(fig: Figure, left, right, where: str, latency_note: str = "") -> Figure:
    """Axis labels, titles, grids and legends of a latency (left) and bus-bandwidth (right) sweep."""
    left.set_ylabel("time per all-reduce (µs)")
    left.set_title(f"All-reduce latency, {where}{latency_note}")
    right.set_ylabel("bus bandwidth, algbw·2(n-1)/n (GB/s)")
    right.set_title(f"All-reduce bus bandwidth, {where}")
    for ax in (left, right):
        ax.set_xlabel("message size per rank (bytes)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_naive_vs_ring(nbytes: float, ranks: list[int], alpha_s: float, beta_bytes_per_s: float,
                       where: str) -> Figure:
    """Modelled (not measured) naive and ring all-reduce time against the number of ranks."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for name, formula in (("naive (via rank 0)", naive_all_reduce_seconds), ("ring", ring_all_reduce_seconds)):
        ax.plot(ranks, [formula(nbytes, n, alpha_s, beta_bytes_per_s) * 1e3 for n in ranks], "o-", label=name)
    ax.set_xlabel("ranks n")
    ax.set_ylabel("modelled time (ms)")
    ax.set_title(f"α-β model (not measured): {nbytes / 2**20:g} MiB all-reduce, α and β fitted on {where}", fontsize=10)
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def plot_transport_sweeps(sizes_bytes: list[int], seconds: dict[str, list[float]], n: int,
                          fits: dict[str, tuple[float, float]], where: str) -> Figure:
    """Measured all-reduce time (left) and bus bandwidth (right) per message size for several transports, each
    with the α-β model fitted to its own points (dashed)."""
    sizes = np.asarray(sizes_bytes, dtype=float)
    smooth = np.geomspace(sizes.min(), sizes.max(), 200)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for (name, times), marker in zip(seconds.items(), "osD^v"):
        alpha, beta = fits[name]
        line = left.loglog(sizes, np.asarray(times) * 1e6, marker, label=f"{name} (α={alpha * 1e6:.0f} µs, "
                                                                          f"β={beta / 1e9:.2f} GB/s)")[0]
        left.loglog(smooth, [ring_all_reduce_seconds(s, n, alpha, beta) * 1e6 for s in smooth], "--",
                    color=line.get_color())
        right.semilogx(sizes, [bus_bandwidth(s, t, n) / 1e9 for s, t in zip(sizes, times)], marker + "-",
                       color=line.get_color(), label=name)
    return _finish_sweep(fig, left, right, f"{where}, {n} ranks", " (dashed: fitted α-β)")
