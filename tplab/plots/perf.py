"""Figures of the cost model (:mod:`tplab.perf.estimate`). Every title says "modelled": none of these is a measurement."""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tplab.perf.estimate import Estimate
from tplab.perf.pipeline import PipelineEstimate
from tplab.perf.replicas import ReplicaOption

MEMORY_PARTS = ("weights", "kv_cache", "activations", "runtime_overhead")
TIME_PARTS = ("weights", "kv_cache", "compute", "communication")
COLORS = {"weights": "tab:blue", "kv_cache": "tab:orange", "activations": "tab:green", "runtime_overhead": "tab:gray",
          "compute": "tab:purple", "communication": "tab:red"}


def _axes(ax: Axes | None, size: tuple[float, float] = (6, 4)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=size)
    return fig, ax


VISIBLE_FRACTION = 0.005  # a part under 0.5% of the tallest bar everywhere could not be seen: it is named, not drawn


def _stacked(ax: Axes, labels: list[str], parts: list[dict[str, float]], names: tuple[str, ...]) -> list[str]:
    """Stacked bars of the visible parts; returns the names of the parts too small to draw anywhere."""
    bottom = [0.0] * len(labels)
    tallest = max(sum(p[name] for name in names) for p in parts)
    too_small = []
    for name in names:
        values = [p[name] for p in parts]
        if max(values) < VISIBLE_FRACTION * tallest:
            too_small.append(name.replace("_", " "))
            continue
        ax.bar(labels, values, bottom=bottom, color=COLORS[name], label=name.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    return too_small


def _name_the_invisible(ax: Axes, too_small: list[str]) -> None:
    if too_small:
        ax.text(0.01, 0.99, f"not drawn (under {VISIBLE_FRACTION:.1%} of the tallest bar): {', '.join(too_small)}",
                transform=ax.transAxes, ha="left", va="top", fontsize=8, color="dimgray")


def _setting(e: Estimate) -> str:
    return f"{e.model}, {e.dtype}, batch {e.batch}, {e.prompt_len}+{e.output_len} tok, {e.gpu}"


def plot_memory(estimates: list[Estimate], capacity_gb: float, ax: Axes | None = None) -> Figure:
    """Stacked per-GPU memory for each estimate (one per tp) against the GPU's capacity and usable memory."""
    fig, ax = _axes(ax)
    _name_the_invisible(ax, _stacked(ax, [f"TP{e.tp}" for e in estimates],
                                     [e.breakdown["memory_gb"] for e in estimates], MEMORY_PARTS))
    ax.axhline(capacity_gb, color="black", label=f"capacity {capacity_gb:g} GB")
    ax.axhline(estimates[0].usable_memory_gb, color="black", linestyle="--", label="usable (after headroom)")
    ax.set_ylabel("memory per GPU (GB)")
    ax.set_xlabel("tensor-parallel degree")
    ax.set_title(f"Memory per GPU (modelled)\n{_setting(estimates[0])}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    return fig


def plot_decode_breakdown(estimates: list[Estimate], labels: list[str] | None = None, ax: Axes | None = None) -> Figure:
    """Stacked decode step time: reading weights, reading the KV cache, compute beyond memory time, collectives."""
    fig, ax = _axes(ax)
    labels = labels or [f"TP{e.tp}" for e in estimates]
    _name_the_invisible(ax, _stacked(ax, labels, [e.breakdown["decode_ms"] for e in estimates], TIME_PARTS))
    for i, e in enumerate(estimates):
        if not e.fits:
            ax.annotate("does not fit", (i, e.decode_ms_per_token), xytext=(0, 4), textcoords="offset points",
                        ha="center", va="bottom", fontsize=10, weight="bold", color="red")
    ax.set_ylim(0, 1.25 * max(e.decode_ms_per_token for e in estimates))  # room above the bars for the labels
    ax.set_ylabel("decode time per token (ms)")
    ax.set_title(f"Decode latency breakdown (modelled)\n{_setting(estimates[0])}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    return fig


def plot_throughput_vs_batch(curves: dict[str, list[Estimate]], ax: Axes | None = None) -> Figure:
    """Output tokens/s per GPU against batch, one line per configuration, stopping where memory runs out (×)."""
    fig, ax = _axes(ax)
    for label, curve in curves.items():
        fitting = [e for e in curve if e.fits]
        if not fitting:
            ax.plot([], [], " ", label=f"{label}: does not fit")
            continue
        line, = ax.plot([e.batch for e in fitting], [e.throughput_per_gpu_tok_s for e in fitting], marker="o", ms=3,
                        label=label)
        if len(fitting) < len(curve):
            last = fitting[-1]
            ax.plot(last.batch, last.throughput_per_gpu_tok_s, marker="x", ms=9, color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (concurrent sequences)")
    ax.set_ylabel("output tokens/s per GPU")
    first = next(iter(curves.values()))[0]
    ax.set_title(f"Throughput against batch (modelled; × = largest plotted batch that fits)\n{first.model}, {first.dtype}, "
                 f"{first.prompt_len}+{first.output_len} tok, {first.gpu}", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def plot_cost(estimates: list[Estimate], labels: list[str] | None = None, ax: Axes | None = None) -> Figure:
    """Cost per million output tokens for each estimate (which must carry a price); unfit ones are marked."""
    fig, ax = _axes(ax)
    labels = labels or [f"TP{e.tp}" for e in estimates]
    if any(e.cost_per_million_tokens is None for e in estimates):
        raise ValueError("plot_cost needs estimates made with price_per_gpu_hour")
    costs = [e.cost_per_million_tokens if e.fits else 0.0 for e in estimates]
    ax.bar(labels, costs, color="tab:olive")
    for i, e in enumerate(estimates):
        if not e.fits:
            ax.annotate("does not fit", (i, 0), ha="center", va="bottom", fontsize=7, color="red")
    ax.set_ylabel("USD per million output tokens")
    ax.set_title(f"Cost per million tokens (modelled, at the price you gave)\n{_setting(estimates[0])}", fontsize=9)
    return fig


def plot_explorer(estimates: list[Estimate], curves: dict[str, list[Estimate]], capacity_gb: float) -> Figure:
    """The four explorer panels: memory, decode breakdown, throughput against batch, cost (when priced)."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    plot_memory(estimates, capacity_gb, axes[0, 0])
    plot_decode_breakdown(estimates, ax=axes[0, 1])
    plot_throughput_vs_batch(curves, axes[1, 0])
    if estimates[0].cost_per_million_tokens is None:
        axes[1, 1].text(0.5, 0.5, "give a price per GPU-hour\nto see the cost", ha="center", va="center")
        axes[1, 1].set_axis_off()
    else:
        plot_cost(estimates, ax=axes[1, 1])
    fig.tight_layout()
    return fig


def plot_pipeline(tp_all: Estimate, pipelines: list[PipelineEstimate]) -> Figure:
    """Latency, throughput and bubble of TP×PP against micro-batches, with TP across all GPUs as a reference line."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    m = [p.micro_batches for p in pipelines]
    pp_label = f"TP{pipelines[0].tp} x PP{pipelines[0].pp}"
    tp_label = f"TP{tp_all.tp} over {tp_all.interconnect}" + ("" if tp_all.fits else " (does not fit)")
    series = [("decode time per token (ms)", [p.decode_ms_per_token for p in pipelines], tp_all.decode_ms_per_token),
              ("output tokens/s (all GPUs)", [p.throughput_tok_s for p in pipelines], tp_all.throughput_tok_s)]
    for ax, (ylabel, values, reference) in zip(axes, series):
        ax.plot(m, values, marker="o", label=pp_label)
        ax.axhline(reference, color="tab:red", linestyle="--" if tp_all.fits else ":", label=tp_label)
        ax.set_ylabel(ylabel)
    axes[2].plot(m, [100 * p.bubble_fraction for p in pipelines], marker="o", color="tab:gray")
    axes[2].set_ylabel("pipeline bubble (% of a round idle)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("micro-batches m")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"TP inside nodes, PP across nodes (modelled): {tp_all.model}, batch {tp_all.batch}, "
                 f"{tp_all.prompt_len}+{tp_all.output_len} tok, {tp_all.gpu}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_replicas(concurrencies: list[int], sweeps: list[list[ReplicaOption]]) -> Figure:
    """Total throughput and per-token latency against concurrency, one line per layout (sweeps[i] is at concurrencies[i])."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for j, first in enumerate(sweeps[0]):
        points = [(c, sweep[j]) for c, sweep in zip(concurrencies, sweeps) if sweep[j].fits]
        axes[0].plot([c for c, _ in points], [o.throughput_tok_s for _, o in points], marker="o", ms=3, label=first.label)
        axes[1].plot([c for c, _ in points], [o.estimate.decode_ms_per_token for _, o in points], marker="o", ms=3,
                     label=first.label)
    axes[0].set_ylabel("output tokens/s (all GPUs)")
    axes[1].set_ylabel("decode time per token (ms)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
    axes[0].legend(fontsize=7)
    e = sweeps[0][0].estimate
    gpus = sweeps[0][0].replicas * sweeps[0][0].tp
    fig.suptitle(f"One TP group or replicas? (modelled) {gpus} x {e.gpu}, {e.model}, {e.prompt_len}+{e.output_len} tok",
                 fontsize=10)
    fig.tight_layout()
    return fig
