"""Figures of how the TP model is split: heads over ranks (GQA replication), MLP weights, KV-cache memory.

Every drawing is computed from the same functions the model uses
(:func:`tplab.specs.sharding.gqa_heads`, :func:`tplab.layers.shards.ownership_map`), so
the picture cannot disagree with the code.
"""
from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, NullLocator

from tplab.layers.shards import ownership_map
from tplab.specs.sharding import gqa_heads, kv_replicas

RANK_COLORS = plt.get_cmap("tab10").colors


def _axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    return plt.subplots(figsize=size)


def _box(ax: Axes, x: float, y: float, text: str, color, hatch: str | None = None) -> None:
    ax.add_patch(Rectangle((x - 0.4, y - 0.3), 0.8, 0.6, facecolor=color, edgecolor="black", hatch=hatch, alpha=0.85))
    ax.text(x, y, text, ha="center", va="center", fontsize=9)


def _tp_axis(ax: Axes, tps: list[int]) -> None:
    """A log2 x axis of tp degrees, ticked and labelled with the plain numbers."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(tps)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("tensor-parallel degree tp")


def plot_head_split(num_heads: int, num_kv_heads: int, tp: int, ax: Axes | None = None) -> Figure:
    """Query heads (top) and the KV heads each rank holds (bottom), coloured by rank; lines join q head h to KV head h // g.

    When tp > num_kv_heads a KV head appears on several ranks: hatched boxes are copies.
    """
    fig, ax = _axes(ax, (max(6.0, 0.55 * num_heads + 1), 2.8))
    group = num_heads // num_kv_heads
    per_rank = num_heads // tp
    seen: set[int] = set()
    for rank in range(tp):
        q_heads, kv_heads = gqa_heads(num_heads, num_kv_heads, tp, rank)
        color = RANK_COLORS[rank % len(RANK_COLORS)]
        left = rank * per_rank
        ax.add_patch(Rectangle((left - 0.5, -0.6), per_rank, 2.2, facecolor=color, alpha=0.12, edgecolor=color))
        ax.text(left - 0.45, 1.45, f"rank {rank}", fontsize=10, color=color, va="center")
        kv_x = {g: left + (i + 0.5) * per_rank / len(kv_heads) - 0.5 for i, g in enumerate(kv_heads)}
        for h in q_heads:
            ax.plot([h, kv_x[h // group]], [0.7, 0.3], color="gray", lw=0.8)
            _box(ax, h, 1.0, f"q{h}", color)
        for g, x in kv_x.items():
            _box(ax, x, 0.0, f"kv{g}", color, hatch="//" if g in seen else None)
            seen.add(g)
    ax.set_xlim(-0.7, num_heads - 0.3)
    ax.set_ylim(-0.8, 1.7)
    ax.set_yticks([0.0, 1.0], ["KV heads", "query heads"])
    ax.set_xticks([])
    copies = kv_replicas(num_kv_heads, tp)
    note = (f"each KV head replicated on {copies} ranks (hatched: copies)" if copies > 1
            else f"{max(1, num_kv_heads // tp)} KV head(s) per rank, no copies")
    ax.set_title(f"{num_heads} query heads, {num_kv_heads} KV heads, tp={tp}: {note}", fontsize=11)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    return fig


def plot_mlp_split(hidden_size: int, intermediate_size: int, tp: int) -> Figure:
    """Which rank owns each element of gate/up (rows split: column parallel) and down (columns split: row parallel)."""
    cmap = ListedColormap(RANK_COLORS[:tp])
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), gridspec_kw={"width_ratios": [1, 1, 2.2]})
    panels = [("gate_proj.weight", intermediate_size, hidden_size, 0), ("up_proj.weight", intermediate_size, hidden_size, 0),
              ("down_proj.weight", hidden_size, intermediate_size, 1)]
    for ax, (name, rows, cols, split) in zip(axes, panels):
        ax.imshow(ownership_map(rows, cols, tp, split).numpy(), cmap=cmap, vmin=-0.5, vmax=tp - 0.5, aspect="auto",
                  interpolation="nearest")
        kind = "column parallel: rows (outputs) split" if split == 0 else "row parallel: columns (inputs) split"
        ax.set_title(f"{name} ({rows}x{cols})\n{kind}", fontsize=10)
        ax.set_xlabel("input feature")
        ax.set_ylabel("output feature")
    handles = [Rectangle((0, 0), 1, 1, color=RANK_COLORS[r]) for r in range(tp)]
    fig.legend(handles, [f"rank {r}" for r in range(tp)], loc="lower center", ncol=tp, fontsize=9)
    fig.suptitle(f"SwiGLU MLP over tp={tp}: rank $r$ computes $\\mathrm{{silu}}(x W_{{g,r}}^T) \\odot (x W_{{u,r}}^T)$ "
                 "locally, then $x_r W_{d,r}^T$, summed by one all-reduce", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def plot_kv_per_token(rows: list[dict], ax: Axes | None = None) -> Figure:
    """KV-cache bytes per token on one rank against tp, one line per model.

    ``rows``: dicts with ``model``, ``tp``, ``kv_bytes_per_token`` and ``num_kv_heads``.
    A ring marks the tp values beyond the model's KV heads, where the per-rank cache stops shrinking.
    """
    fig, ax = _axes(ax, (6.5, 4))
    series: dict[tuple, list[str]] = {}  # models with the same curve share one line, labelled with all their names
    for model in dict.fromkeys(r["model"] for r in rows):
        curve = tuple((r["tp"], r["kv_bytes_per_token"], r["num_kv_heads"]) for r in rows if r["model"] == model)
        series.setdefault(curve, []).append(model)
    for models in series.values():
        mine = [r for r in rows if r["model"] == models[0]]
        line, = ax.plot([r["tp"] for r in mine], [r["kv_bytes_per_token"] / 1024 for r in mine], marker="o",
                        label=" = ".join(models))
        flat = [r for r in mine if r["tp"] > r["num_kv_heads"]]
        ax.plot([r["tp"] for r in flat], [r["kv_bytes_per_token"] / 1024 for r in flat], "o", ms=11,
                markerfacecolor="none", color=line.get_color())
    ax.plot([], [], "o", ms=11, markerfacecolor="none", color="gray", label="tp > KV heads: replicated, no longer shrinks")
    _tp_axis(ax, [r["tp"] for r in rows])
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel("KV cache per token per rank (KiB)")
    ax.set_title("KV-cache bytes per token on one rank (bf16): 2 · layers · max(1, KV/tp) · head_dim · 2 B", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def plot_token_capacity(rows: list[dict], gpu_memory_gb: float) -> Figure:
    """Left: tokens of KV cache a TP group can hold (every rank holds a slice of every token). Right: the same per GPU.

    ``rows``: dicts with ``model``, ``tp``, ``num_kv_heads`` and ``max_tokens`` (0 when the weights alone do not fit).
    """
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    styles = [dict(marker=m, linestyle=ls) for m, ls in zip("osD^v", ("-", "--", ":", "-.", "-"))]
    for style, model in zip(itertools.cycle(styles), dict.fromkeys(r["model"] for r in rows)):
        mine = [r for r in rows if r["model"] == model and r["max_tokens"] > 0]
        tps = [r["tp"] for r in mine]
        for ax, scale in zip(axes, (1, "per_gpu")):  # marker and dash differ per model: close lines stay visible
            values = [r["max_tokens"] / (r["tp"] if scale == "per_gpu" else 1) / 1e6 for r in mine]
            line, = ax.plot(tps, values, label=model, **style)
            flat = [(t, v) for t, v, r in zip(tps, values, mine) if r["tp"] > r["num_kv_heads"]]
            ax.plot([t for t, _ in flat], [v for _, v in flat], "o", ms=11, markerfacecolor="none", color=line.get_color())
    titles = ("tokens the TP group can cache", "the same, divided by the tp GPUs it uses")
    for ax, title in zip(axes, titles):
        ax.plot([], [], "o", ms=11, markerfacecolor="none", color="gray", label="tp > KV heads (replicated)")
        _tp_axis(ax, [r["tp"] for r in rows])
        ax.set_yscale("log")
        ax.set_ylabel("tokens (millions)")
        ax.set_title(f"{title}\n{gpu_memory_gb:g} GB per GPU minus the weight shard (bf16), no other overhead",
                     fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
