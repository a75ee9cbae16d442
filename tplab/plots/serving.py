"""Figures of serving runs: policies side by side, the admission cap's trade, stalls, the simulator's check."""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from tplab.serving.metrics import percentiles_of


def grouped_bars(ax, groups: dict[str, list[float]], labels: list[str]) -> None:
    """One bar per group side by side at each label, the groups in the legend."""
    width = 0.8 / len(groups)
    for i, (name, values) in enumerate(groups.items()):
        ax.bar([j + (i - (len(groups) - 1) / 2) * width for j in range(len(labels))], values, width, label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.legend(fontsize=8)


def plot_policies(runs: dict[str, dict], title: str) -> Figure:
    """Throughput (left) and p50/p95 TTFT and latency (right) of each policy's run of the same requests."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(runs)
    left.bar(names, [runs[n]["summary"]["throughput_tok_s"] for n in names], color="tab:blue")
    left.set_ylabel("output tokens/s")
    left.set_title("throughput")
    series = [("ttft_ms", "p50"), ("ttft_ms", "p95"), ("latency_ms", "p50"), ("latency_ms", "p95")]
    grouped_bars(right, {name: [percentiles_of(runs[name]["requests"], metric)[q] / 1000 for metric, q in series]
                         for name in names}, [f"{'TTFT' if m == 'ttft_ms' else 'latency'} {q}" for m, q in series])
    right.set_ylabel("seconds")
    right.set_title("per request")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_cap_sweep(runs: dict[int, dict], title: str) -> Figure:
    """For each admission cap: throughput against p95 TTFT (left) and against p50 TPOT (right), caps labelled."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    throughput = [run["summary"]["throughput_tok_s"] for run in runs.values()]
    for ax, (metric, q, name) in zip(axes, [("ttft_ms", "p95", "p95 TTFT (ms)"), ("tpot_ms", "p50", "p50 TPOT (ms)")]):
        values = [percentiles_of(run["requests"], metric)[q] for run in runs.values()]
        ax.plot(throughput, values, "o-")
        for cap, x, y in zip(runs, throughput, values):
            ax.annotate(f"cap {cap}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("throughput (output tokens/s)")
        ax.set_ylabel(name)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_stalls(runs: dict[str, dict], request_ids: list[int], title: str) -> Figure:
    """The longest gap between two outputs of each of ``request_ids``, per run."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    grouped_bars(ax, {name: [run["requests"][r]["itl_max_ms"] for r in request_ids] for name, run in runs.items()},
                 [f"request {r}" for r in request_ids])
    ax.set_ylabel("longest gap between two tokens (ms)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_simulator_check(rates: dict[float, dict], title: str) -> Figure:
    """Measured against simulated p50 and p95, one panel per metric, one point per rate and percentile."""
    metrics = ("ttft_ms", "tpot_ms", "latency_ms")
    fig, axes = plt.subplots(1, len(metrics), figsize=(12, 3.6))
    for ax, metric in zip(axes, metrics):
        for q, marker in (("p50", "o"), ("p95", "s")):
            measured = [a["percentiles"][metric]["measured"][q] for a in rates.values()]
            simulated = [a["percentiles"][metric]["simulated"][q] for a in rates.values()]
            ax.scatter(measured, simulated, marker=marker, label=q)
            for rate, x, y in zip(rates, measured, simulated):
                ax.annotate(f"{rate:g}/s", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        top = max(max(a["percentiles"][metric]["measured"][q], a["percentiles"][metric]["simulated"][q])
                  for a in rates.values() for q in ("p50", "p95")) * 1.1
        ax.plot([0, top], [0, top], color="grey", lw=1, label="equal")
        ax.set_xlabel(f"measured {metric.removesuffix('_ms')} (ms)")
        ax.set_ylabel(f"simulated {metric.removesuffix('_ms')} (ms)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_deployments(results: dict[str, list[dict]], title: str) -> Figure:
    """Modelled deployments over rates: throughput (left), p95 TTFT (middle) and p95 TPOT (right) per rate.

    Below capacity every option serves the whole offered load, so their throughput lines meet; each option has its
    own marker and line style so that none hides another."""
    from matplotlib.ticker import FormatStrFormatter

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":")]
    for (name, rows), (marker, line) in zip(results.items(), styles * len(results)):
        rates = [r["rate"] for r in rows]
        kw = dict(marker=marker, linestyle=line, label=name)
        axes[0].plot(rates, [r["throughput_tok_s"] for r in rows], **kw)
        axes[1].plot(rates, [r["p95"]["ttft_ms"] / 1000 for r in rows], **kw)
        axes[2].plot(rates, [r["p95"]["tpot_ms"] for r in rows], **kw)
    for ax, label in zip(axes, ["output tokens/s (all GPUs)", "p95 TTFT (s, log scale)", "p95 TPOT (ms)"]):
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel(label)
    axes[1].set_yscale("log")
    axes[1].yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    axes[1].yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
