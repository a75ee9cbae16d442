"""Figures of measurements against the cost model. Every line says what it is: measured, emulated or modelled.

* measured: real ranks, real collectives (solid line, circles);
* emulated: one rank timed alone, collectives modelled (dashed, squares);
* modelled: the cost model, nothing run (dotted, no markers).

Titles end with the kinds they show, so a figure copied out of its notebook
still says how its numbers were obtained.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from tplab.bench.records import full_model_ms

KINDS = ("measured", "emulated", "modelled")
STYLES = {"measured": dict(marker="o", linestyle="-"), "emulated": dict(marker="s", linestyle="--"),
          "modelled": dict(marker=None, linestyle=":", linewidth=2)}


@dataclass(frozen=True)
class Series:
    """One line: y against x, of one kind, with its legend label and colour."""

    label: str
    kind: str
    x: list[float]
    y: list[float]
    color: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"a series' kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.x) != len(self.y):
            raise ValueError(f"series {self.label!r} has {len(self.x)} x values and {len(self.y)} y values")


def kinds_note(kinds) -> str:
    """"measured / modelled": the kinds present, in a fixed order."""
    present = set(kinds)
    return " / ".join(k for k in KINDS if k in present)


def _plain_ticks(axis) -> None:
    """Label a log axis 1, 2, 4 ... or 100, 1000 instead of powers (no labels on minor ticks)."""
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_series(series: list[Series], xlabel: str, ylabel: str, title: str, ax: Axes | None = None,
                logx: bool = False, logy: bool = False) -> Figure:
    """Lines of several kinds on one axes; the title gets the kinds shown, in parentheses."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
    for s in series:
        ax.plot(s.x, s.y, label=f"{s.label} ({s.kind})", color=s.color, **STYLES[s.kind])
    if logx:
        ax.set_xscale("log", base=2)
        _plain_ticks(ax.xaxis)
    if logy:
        ax.set_yscale("log")
        _plain_ticks(ax.yaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\n({kinds_note(s.kind for s in series)})", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return ax.figure


def record_series(records: list[dict], x: str, y: Callable[[dict], float], group: str = "tp",
                  label: str = "tp={}", kind: str | None = None) -> list[Series]:
    """One series per value of ``setting[group]``: y(record) against ``setting[x]``, sorted by x.

    The kind of each series is its records' kind (records of both kinds in
    one group raise, so a line never mixes measured and emulated points),
    unless ``kind`` says otherwise: "modelled" when ``y`` evaluates the cost
    model at the records' points.
    """
    groups: dict = defaultdict(list)
    for r in records:
        groups[r["setting"][group]].append(r)
    out = []
    for i, (value, rs) in enumerate(sorted(groups.items())):
        kinds = {r["kind"] for r in rs}
        if len(kinds) > 1:
            raise ValueError(f"{group}={value} mixes {sorted(kinds)} records: plot them as separate series")
        rs = sorted(rs, key=lambda r: r["setting"][x])
        out.append(Series(label.format(value), kind or kinds.pop(), [r["setting"][x] for r in rs], [y(r) for r in rs],
                          f"C{i}"))
    return out


def plot_time_split(labels: list[str], compute_ms: list[float], comm_ms: list[float], kind: str, title: str,
                    ylabel: str = "time per decode step (ms)", ax: Axes | None = None) -> Figure:
    """Stacked bars: compute and collectives per configuration, each bar annotated with the collectives' share."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(labels, compute_ms, color="tab:blue", label="compute")
    ax.bar(labels, comm_ms, bottom=compute_ms, color="tab:red", label="collectives")
    for i, (compute, comm) in enumerate(zip(compute_ms, comm_ms)):
        ax.annotate(f"{100 * comm / (compute + comm):.0f}%", (i, compute + comm), ha="center", va="bottom", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\n({kind}; % = share of collectives)", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7)
    return ax.figure


# the record's field (and the Estimate's attribute of the same name): its axis label
RECORD_FIELDS = {"decode_ms_per_token": "decode time per token (ms)", "ttft_ms": "time to first token (ms)"}


def plot_against_model(pairs: list[tuple[dict, object]], title: str) -> Figure:
    """Decode ms/token and TTFT against batch, one row per prompt length: the records (their kind) against the
    cost model at the same points (dotted), one colour per tp."""
    prompts = sorted({r["setting"]["prompt_len"] for r, _ in pairs})
    tps = sorted({r["setting"]["tp"] for r, _ in pairs})
    fig, axes = plt.subplots(len(prompts), 2, figsize=(12, 4.2 * len(prompts)), squeeze=False)
    for row, prompt in zip(axes, prompts):
        for ax, (field, ylabel) in zip(row, RECORD_FIELDS.items()):
            series = []
            for i, tp in enumerate(tps):
                at = sorted(((r, e) for r, e in pairs if r["setting"]["prompt_len"] == prompt
                             and r["setting"]["tp"] == tp), key=lambda pair: pair[0]["setting"]["batch"])
                for kind in ("measured", "emulated"):
                    of_kind = [r for r, _ in at if r["kind"] == kind]
                    if of_kind:
                        series.append(Series(f"tp={tp}", kind, [r["setting"]["batch"] for r in of_kind],
                                             [full_model_ms(r, field) for r in of_kind], f"C{i}"))
                if at:
                    series.append(Series(f"tp={tp}", "modelled", [r["setting"]["batch"] for r, _ in at],
                                         [getattr(e, field) for _, e in at], f"C{i}"))
            plot_series(series, "batch (sequences)", ylabel, f"prompt {prompt} tokens", ax=ax, logx=True, logy=True)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
