"""An ipywidgets explorer of the cost model: pick a model, GPU, link, precision, TP degree, batch, context and load.

The notebook builds a :class:`TPExplorer` and displays it. Every change
recomputes the modelled estimates, keeps them on the object (``estimate``,
``estimates``, ``curves``, ``replicas``, ``error``) so tests can set a widget's
``.value`` and assert on what it produced, and redraws the plots of
:mod:`tplab.plots.perf`.

The view is an ``HTML`` widget (the summary and the replica table) and an
``Image`` widget (the figure, as PNG), not an ``Output`` widget capturing
``display()``. A headless executor (nbclient, under nbconvert and nbmake)
mimics a frontend's Output widget by sending a comm message on the kernel's
shell channel for every captured output, while it waits on that same channel
for the cell's reply; that reply can then go unnoticed until the cell's
timeout, so a notebook run stalls N seconds per widget cell (forever without
a timeout). Setting widget values sends nothing back.
"""
from __future__ import annotations

import html
import io

import ipywidgets as w
import matplotlib.pyplot as plt
from IPython.display import display
from matplotlib.figure import Figure

from tplab.perf.estimate import Estimate, estimate
from tplab.perf.replicas import ReplicaOption, compare_replicas
from tplab.perf.shapes import WEIGHT_BYTES
from tplab.plots.perf import plot_explorer
from tplab.specs.efficiency import load_efficiency
from tplab.specs.hardware import gpu_names, load_gpu
from tplab.specs.model import model_names, resolve_model

BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
OUTPUT_LEN = 256


class TPExplorer:
    """Controls and modelled plots for one deployment question; ``widget`` is what the notebook displays."""

    def __init__(self, model: str = "llama-3-70b", gpu: str = "h100-sxm", tp: int = 8, dtype: str = "bf16",
                 batch: int = 16, context: int = 4096, concurrency: int = 32, price_per_gpu_hour: float = 0.0,
                 draw: bool = True):
        style = {"description_width": "110px"}
        self.model = w.Dropdown(options=model_names(), value=model, description="model", style=style)
        self.gpu = w.Dropdown(options=gpu_names(), value=gpu, description="GPU", style=style)
        self.interconnect = w.ToggleButtons(options=list(load_gpu(gpu).interconnects), description="interconnect",
                                            style=style)
        self.dtype = w.Dropdown(options=list(WEIGHT_BYTES), value=dtype, description="weights", style=style)
        self.tp = w.Dropdown(options=self._tp_options(), value=tp, description="TP degree", style=style)
        self.batch = w.SelectionSlider(options=BATCHES, value=batch, description="batch", style=style)
        self.context = w.IntSlider(value=context, min=512, max=8192, step=256, description="context (tokens)",
                                   style=style, continuous_update=False)
        self.concurrency = w.IntSlider(value=concurrency, min=1, max=512, description="concurrency", style=style,
                                       continuous_update=False)
        self.price = w.FloatText(value=price_per_gpu_hour, description="USD/GPU-hour", style=style)
        self.summary, self.figure = w.HTML(), w.Image(format="png")
        self.draw = draw
        self.estimate: Estimate | None = None
        self.estimates: list[Estimate] = []
        self.curves: dict[str, list[Estimate]] = {}
        self.replicas: list[ReplicaOption] = []
        self.error: str | None = None
        self._syncing = False
        self._sync_choices()
        controls = [self.model, self.gpu, self.interconnect, self.dtype, self.tp, self.batch, self.context,
                    self.concurrency, self.price]
        for control in controls:
            control.observe(self._on_change, names="value")
        self.widget = w.VBox([w.HBox([w.VBox(controls[:5]), w.VBox(controls[5:])]), self.summary, self.figure])
        self.update()

    def _ipython_display_(self) -> None:
        display(self.widget)

    def _tp_options(self) -> list[int]:
        spec, hw = resolve_model(self.model.value, strict=False), load_gpu(self.gpu.value)
        reach = max(link.max_gpus or 1 for link in hw.interconnects.values())
        return spec.valid_tp(reach)

    def _sync_choices(self) -> None:
        """Keep the TP, interconnect and context choices valid for the chosen model and GPU."""
        self._syncing = True
        try:
            links = list(load_gpu(self.gpu.value).interconnects)
            if list(self.interconnect.options) != links:
                self.interconnect.options = links
            tps = self._tp_options()
            if list(self.tp.options) != tps:
                keep = self.tp.value if self.tp.value in tps else tps[-1]
                self.tp.options, self.tp.value = tps, keep
            limit = resolve_model(self.model.value, strict=False).max_position_embeddings or 131072
            self.context.max = limit
        finally:
            self._syncing = False

    def _on_change(self, change: dict) -> None:
        if not self._syncing:
            self._sync_choices()
            self.update()

    def _kw(self) -> dict:
        price = self.price.value if self.price.value > 0 else None
        return dict(model=resolve_model(self.model.value, strict=False), gpu=load_gpu(self.gpu.value), dtype=self.dtype.value,
                    interconnect=self.interconnect.value, prompt_len=self.context.value - OUTPUT_LEN,
                    output_len=OUTPUT_LEN, price_per_gpu_hour=price, efficiency=load_efficiency())

    def update(self) -> None:
        """Recompute every estimate for the current choices and redraw; an invalid choice sets ``error``."""
        kw = self._kw()
        try:
            tps = [t for t in self.tp.options if t <= (kw["gpu"].link(kw["interconnect"]).max_gpus or t)]
            self.estimates = [estimate(tp=t, batch=self.batch.value, **kw) for t in tps]
            self.estimate = estimate(tp=self.tp.value, batch=self.batch.value, **kw)
            self.curves = {f"TP{t}": [estimate(tp=t, batch=b, **kw) for b in BATCHES] for t in tps}
            replica_kw = {k: v for k, v in kw.items() if k != "dtype"}
            options = [(t, self.dtype.value) for t in tps if t <= self.tp.value]
            self.replicas = compare_replicas(gpus=self.tp.value, options=options, concurrency=self.concurrency.value,
                                             **replica_kw)
            self.error = None
        except ValueError as e:
            self.estimate, self.error = None, str(e)
        if self.draw:
            self._render()

    def _render(self) -> None:
        if self.error:
            self.summary.value = f"<b>Not a valid configuration:</b> {html.escape(self.error)}"
            self.figure.value = b""
            return
        self.summary.value = f"<pre>{html.escape(self.estimate.summary())}</pre>{self._replica_table()}"
        fig = plot_explorer(self.estimates, self.curves, load_gpu(self.gpu.value).memory_gb)
        self.figure.value = figure_png(fig)
        plt.close(fig)

    def _replica_table(self) -> str:
        rows = "".join(
            f"<tr><td>{o.label}</td><td>{o.batch_per_replica}</td><td>{'yes' if o.fits else 'no'}</td>"
            f"<td>{o.estimate.decode_ms_per_token:.1f}</td><td>{o.throughput_tok_s:.0f}</td>"
            f"<td>{'-' if o.cost_per_million_tokens is None else f'{o.cost_per_million_tokens:.2f}'}</td></tr>"
            for o in self.replicas)
        return (f"<p>The same {self.tp.value} GPUs at concurrency {self.concurrency.value}, as one TP group or as "
                f"replicas (modelled):</p><table><tr><th>layout</th><th>batch/replica</th><th>fits</th>"
                f"<th>ms/token</th><th>tok/s</th><th>USD/1M tok</th></tr>{rows}</table>")


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes (what an ``ipywidgets.Image`` shows)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()
