"""Figures for the generation loop: a timeline of one step's collectives, where each step's time goes, a decode
step against its bandwidth floor, and what each pipeline stage does over a few steps."""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def plot_collective_timeline(events: list[dict], step: int, title: str) -> Figure:
    """One bar per collective of step ``step`` (x: ms since the step's first collective began, y: its label).

    ``events``: :func:`tplab.lab.block_programs.timed_generation_rank`'s ``events``.
    """
    chosen = [e for e in events if e["step"] == step]
    if not chosen:
        raise ValueError(f"no collectives recorded for step {step}")
    t0 = chosen[0]["start"]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(chosen) + 1.2))
    for i, e in enumerate(chosen):
        color = "tab:blue" if e["op"] == "all_reduce" else "tab:orange"
        ax.barh(i, 1000 * (e["end"] - e["start"]), left=1000 * (e["start"] - t0), color=color, height=0.6)
        ax.text(1000 * (e["end"] - t0), i, f" {e['op']}, {e['bytes']} B", va="center", fontsize=7)
    ax.set_yticks(range(len(chosen)), [e["label"] for e in chosen])
    ax.invert_yaxis()
    ax.set_xlabel("time since the step's first collective began (ms)")
    ax.set_ylabel("collective (issue order)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_step_breakdown(rows: dict[str, list[tuple[float, float]]], title: str) -> Figure:
    """Stacked bars per step: compute vs inside collectives (ms), one panel per run.

    ``rows[name]``: per step (compute seconds, collective seconds); step 0 is the prefill.
    """
    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.2), sharey=True, squeeze=False)
    for ax, (name, steps) in zip(axes[0], rows.items()):
        x = range(len(steps))
        compute = [1000 * c for c, _ in steps]
        comm = [1000 * m for _, m in steps]
        ax.bar(x, compute, color="tab:green", label="compute (step minus collectives)")
        ax.bar(x, comm, bottom=compute, color="tab:blue", label="inside collectives")
        ax.set_xticks(list(x), ["prefill" if i == 0 else str(i) for i in x])
        ax.set_xlabel("step (decode steps numbered)")
        ax.set_title(name, fontsize=10)
    axes[0][0].set_ylabel("wall time (ms)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_bandwidth_floor(step_ms: dict[str, float], floor_ms: float, title: str) -> Figure:
    """One horizontal bar per decode path (ms per step) beside the floor, weight bytes / copy bandwidth, each bar
    labelled with its share of the floor's speed (floor / step time)."""
    names = ["floor: weights / copy bandwidth", *step_ms]
    values = [floor_ms, *step_ms.values()]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.2))
    ax.barh(range(len(names)), values, color=["tab:gray", *["tab:blue"] * len(step_ms)], height=0.6)
    for i, ms in enumerate(values):
        ax.text(ms, i, f" {ms:.2f} ms ({100 * floor_ms / ms:.0f}% of the limit)", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.45 * max(values))
    ax.set_xlabel("time per decode step (ms)")
    ax.set_ylabel("decode path")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_stage_timeline(timelines: list[dict], title: str, ax=None) -> Figure:
    """One row per pipeline stage: work (solid) and waits in the pipeline group (hatched), in ms from the first
    segment. ``timelines``: each stage's :func:`tplab.bench.pipeline.stage_timeline_rank`."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 0.6 * len(timelines) + 1.2))
    t0 = min(seg[2] for t in timelines for seg in t["segments"])
    for t in timelines:
        for _, kind, start, end in t["segments"]:
            work = kind == "work"
            ax.barh(t["stage"], 1000 * (end - start), left=1000 * (start - t0), height=0.6,
                    color=f"C{t['stage']}" if work else "white", hatch=None if work else "///", edgecolor="black",
                    linewidth=0.3)
    ax.set_yticks([t["stage"] for t in timelines], [f"stage {t['stage']}" for t in timelines])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms); solid: computing, hatched: waiting in the pipeline group")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
