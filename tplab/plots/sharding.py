"""Which block of a weight each rank holds, drawn from :func:`tplab.layers.shards.ownership_map`."""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from tplab.layers.shards import ownership_map


@dataclass(frozen=True)
class WeightPanel:
    """One weight matrix to draw: its name, shape (rows x cols), and the dimension split across ranks."""

    title: str
    rows: int
    cols: int
    split_dim: int  # 0: rows are split across ranks, 1: columns are
    row_label: str
    col_label: str


def rank_colors(tp: int) -> list:
    """One color per rank (tab10, cycling past 10 ranks)."""
    return [plt.get_cmap("tab10")(r % 10) for r in range(tp)]


def plot_ownership(panels: list[WeightPanel], tp: int, suptitle: str = "") -> Figure:
    """Side-by-side maps of weight matrices, each element colored by the rank that holds it."""
    colors = rank_colors(tp)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        owner = ownership_map(panel.rows, panel.cols, tp, panel.split_dim)
        ax.imshow(owner.numpy(), cmap=ListedColormap(colors), vmin=-0.5, vmax=tp - 0.5,
                  interpolation="nearest", aspect="auto")
        size = (panel.rows, panel.cols)[panel.split_dim]
        for r in range(tp):  # label each block at its centre
            centre = (r + 0.5) * size / tp - 0.5
            x, y = ((panel.cols - 1) / 2, centre) if panel.split_dim == 0 else (centre, (panel.rows - 1) / 2)
            ax.text(x, y, f"rank {r}", ha="center", va="center", color="white", fontsize=9, weight="bold",
                    rotation=0 if panel.split_dim == 0 or tp <= 4 else 90)
        ax.set_title(panel.title)
        ax.set_xlabel(f"{panel.col_label} index (0 to {panel.cols - 1})")
        ax.set_ylabel(f"{panel.row_label} index (0 to {panel.rows - 1})")
    fig.legend(handles=[Patch(color=c, label=f"rank {r}") for r, c in enumerate(colors)],
               loc="lower center", ncol=min(tp, 8), frameon=False)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def plot_linear_splits(in_features: int, out_features: int, tp: int) -> Figure:
    """A = W^T (in x out) split by columns (column parallel) and by rows (row parallel)."""
    k, n = "input feature", "output feature"
    return plot_ownership([
        WeightPanel(r"column parallel: $A = [A_1 \,\cdots\, A_p]$", in_features, out_features, 1, k, n),
        WeightPanel(r"row parallel: $A = [A_1; \,\cdots\,; A_p]$", in_features, out_features, 0, k, n),
    ], tp, suptitle=f"Who holds which block of $A$ ($Y = XA$), tp={tp}")


def plot_mlp_split(hidden: int, ffn: int, tp: int) -> Figure:
    """Megatron MLP: A (hidden x ffn) split by columns, B (ffn x hidden) by rows; rank r's blocks match."""
    h, f = "hidden feature", "ffn feature"
    return plot_ownership([
        WeightPanel("$A$, column parallel (up)", hidden, ffn, 1, h, f),
        WeightPanel("$B$, row parallel (down)", ffn, hidden, 0, f, h),
    ], tp, suptitle=f"$Y = \\mathrm{{GELU}}(XA)B$ on tp={tp}: rank $r$'s columns of $A$ feed its rows of $B$")
