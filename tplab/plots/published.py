"""The cost model against published GPU measurements: predicted against published, and the residuals.

``pairs`` are (figure, predicted) as :func:`tplab.bench.fit.cross_validate` gives them (or any prediction).
Every title says "modelled": the y values are the model's, the x values the published measurements.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

METRIC_LABELS = {"decode_ms_per_token": "decode (ms/token)", "ttft_ms": "TTFT (ms)",
                 "throughput_tok_s": "throughput (output tok/s)"}
GPU_STYLE = {"a100-sxm-80gb": ("tab:blue", "o"), "h100-sxm": ("tab:orange", "s"), "h200": ("tab:green", "^"),
             "l40s": ("tab:purple", "D")}


def _by_gpu(pairs: list[tuple[dict, float]], metric: str) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for figure, predicted in pairs:
        if figure["metric"] == metric:
            out.setdefault(figure["gpu"], []).append((figure["value"], predicted))
    return out


def plot_predicted_vs_published(pairs: list[tuple[dict, float]], title: str) -> Figure:
    """One log-log panel per metric: modelled against published, coloured by GPU, with y = x and ±10%."""
    metrics = [m for m in METRIC_LABELS if any(f["metric"] == m for f, _ in pairs)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4))
    for ax, metric in zip(axes, metrics):
        groups = _by_gpu(pairs, metric)
        values = [v for points in groups.values() for point in points for v in point]
        low, high = min(values) / 1.3, max(values) * 1.3
        ax.plot([low, high], [low, high], color="black", lw=1, label="y = x")
        ax.fill_between([low, high], [low * 0.9, high * 0.9], [low * 1.1, high * 1.1], color="gray", alpha=0.2,
                        label="±10%")
        for gpu, points in sorted(groups.items()):
            color, marker = GPU_STYLE.get(gpu, ("tab:gray", "x"))
            ax.scatter([p for p, _ in points], [m for _, m in points], s=18, color=color, marker=marker, label=gpu)
        ax.set(xscale="log", yscale="log", xlim=(low, high), ylim=(low, high),
               xlabel=f"published {METRIC_LABELS[metric]}", ylabel=f"modelled {METRIC_LABELS[metric]}")
        steps = (1, 2, 5) if high / low < 100 else (1,)  # plain numbers, no crowded minor labels
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(LogLocator(subs=steps))
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
        ax.set_title(METRIC_LABELS[metric], fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_residuals(pairs: list[tuple[dict, float]], title: str) -> Figure:
    """(modelled / published - 1) in % of every figure, one column per metric, coloured by GPU."""
    metrics = [m for m in METRIC_LABELS if any(f["metric"] == m for f, _ in pairs)]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for i, metric in enumerate(metrics):
        for j, (gpu, points) in enumerate(sorted(_by_gpu(pairs, metric).items())):
            color, marker = GPU_STYLE.get(gpu, ("tab:gray", "x"))
            offsets = [i + 0.15 * (j - 1.5) for _ in points]
            ax.scatter(offsets, [100 * (m / p - 1) for p, m in points], s=14, color=color, marker=marker,
                       label=gpu if i == 0 else None)
    ax.axhline(0, color="black", lw=1)
    for bound in (-10, 10):
        ax.axhline(bound, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(metrics)), [METRIC_LABELS[m] for m in metrics])
    ax.set_ylabel("modelled / published - 1 (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    return fig


def plot_error_comparison(medians: dict[str, dict[str, float]], title: str) -> Figure:
    """Grouped bars: the median |modelled / published - 1| (%) of each cost model, per metric."""
    metrics = [m for m in METRIC_LABELS if any(m in v for v in medians.values())]
    fig, ax = plt.subplots(figsize=(11, 3.8))
    width = 0.8 / len(medians)
    for i, (name, by_metric) in enumerate(medians.items()):
        xs = [j + (i - (len(medians) - 1) / 2) * width for j in range(len(metrics))]
        bars = ax.bar(xs, [100 * by_metric[m] for m in metrics], width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(metrics)), [METRIC_LABELS[m] for m in metrics])
    ax.set_ylabel("median |modelled / published - 1| (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig
