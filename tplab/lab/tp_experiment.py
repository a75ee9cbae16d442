"""One TP-degree experiment on the real generation loop, and an ipywidgets panel that runs it.

:func:`run_experiment` launches ``tp`` ranks (threads or gloo processes) of
:func:`tplab.engine.generate.generate_rank_program` on ``batch`` different prompts,
each about ``prompt_len`` tokens cut from a different topic of the tiny model's
corpus, greedy, and reports what every rank held and sent:

* weight bytes per rank: the bytes it read from the checkpoint (its shard, plus
  the replicated norms);
* KV-cache bytes per rank: 2 * layers * local KV heads * head_dim * element
  size * batch * slots, slots = T + max_new_tokens - 1 (T: the longest prompt);
* collectives per phase and op (count, bytes) and decode ms per token, measured.

Every call also runs tp = 1 on the same backend, on the same prompts, right
after: its tokens are the reference (TP must not change greedy output) and its
ms per token is the baseline the tp run is compared with, measured in the same
call. :class:`TPExperiment` wires the choices to widgets, shows the decoded
tokens and the numbers, and keeps each run in ``last_result`` (or the reason a
choice was refused in ``error``).
"""
from __future__ import annotations

import functools
import html
from dataclasses import dataclass
from pathlib import Path

import ipywidgets as w
from IPython.display import display

from tplab.comm.launch import BACKENDS, launch
from tplab.engine.generate import generate_rank_program
from tplab.model.loading import resolve_dtype
from tplab.specs.model import resolve_model
from tplab.specs.tiny import TINY_DIR, corpus_texts

MAX_BATCH = 8


@dataclass
class ExperimentResult:
    """What one run produced; per-rank lists are indexed by rank."""

    tp: int
    backend: str
    prompts: list[list[int]]
    tokens: list[list[int]]
    texts: list[str]  # the prompts and their new tokens, decoded
    matches_tp1: bool
    weight_bytes: list[int]
    kv_cache_bytes: list[int]
    comm: dict[str, dict[str, dict[str, float]]]  # {"prefill"/"decode": {op: {"count", "bytes", "seconds"}}}
    ms_per_token: float | None
    ttft_ms: float
    baseline_ms_per_token: float | None  # tp = 1, same backend and prompts, measured in the same call


@functools.lru_cache(maxsize=1)
def _corpus_texts(model_dir: str) -> list[str]:
    return corpus_texts(Path(model_dir))


@functools.lru_cache(maxsize=1)
def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


def corpus_prompts(batch: int, prompt_len: int, model_dir: str | Path = TINY_DIR) -> list[list[int]]:
    """``batch`` prompts from different topics of the corpus; row b keeps ``prompt_len - b % 3`` tokens (at least 1)."""
    texts = _corpus_texts(str(model_dir))
    if not 1 <= batch <= len(texts):
        raise ValueError(f"batch must be between 1 and {len(texts)} (one corpus topic per row), got {batch}")
    tokenizer = _tokenizer(str(model_dir))
    step = len(texts) // batch
    # 4 characters per token is generous for this BPE; a prefix keeps the tokenizer off whole topics
    return [tokenizer(texts[b * step][:4 * prompt_len + 64]).input_ids[:max(1, prompt_len - b % 3)]
            for b in range(batch)]


def run_experiment(tp: int, backend: str, batch: int, prompt_len: int, max_new_tokens: int = 8,
                   model_dir: str | Path = TINY_DIR) -> ExperimentResult:
    """Greedy generation at ``tp`` on ``backend`` (no EOS stop, so every row makes ``max_new_tokens`` tokens)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    config = resolve_model(model_dir)
    config.check_tp(tp)
    if not 1 <= prompt_len <= config.max_position_embeddings - max_new_tokens:
        raise ValueError(f"prompt_len must be between 1 and {config.max_position_embeddings - max_new_tokens} "
                         f"(context {config.max_position_embeddings} minus max_new_tokens={max_new_tokens})")
    prompts = corpus_prompts(batch, prompt_len, model_dir)
    kwargs = dict(model=str(model_dir), prompts=prompts, max_new_tokens=max_new_tokens, eos_token_ids=())
    ranks = launch(generate_rank_program, tp, backend, kwargs=kwargs)
    baseline = launch(generate_rank_program, 1, backend, kwargs=kwargs)[0]
    tokenizer = _tokenizer(str(model_dir))
    slots = max(map(len, prompts)) + max_new_tokens - 1
    kv = [config.kv_bytes_per_token(tp, resolve_dtype(None, config)) * batch * slots] * tp
    first = ranks[0]
    return ExperimentResult(
        tp=tp, backend=backend, prompts=prompts, tokens=first.tokens,
        texts=[tokenizer.decode(p) + " | " + tokenizer.decode(t) for p, t in zip(prompts, first.tokens)],
        matches_tp1=all(r.tokens == baseline.tokens for r in ranks),
        weight_bytes=[r.load.bytes_read for r in ranks], kv_cache_bytes=kv, comm=first.comm,
        ms_per_token=first.ms_per_token, ttft_ms=1000 * first.ttft_s, baseline_ms_per_token=baseline.ms_per_token)


def result_html(result: ExperimentResult) -> str:
    """A small HTML report of one run: per-rank memory, collectives per phase, timings."""
    rows = "".join(f"<tr><td>{rank}</td><td>{wb / 1e6:.2f}</td><td>{kb / 1e3:.1f}</td></tr>"
                   for rank, (wb, kb) in enumerate(zip(result.weight_bytes, result.kv_cache_bytes)))
    comm = "".join(f"<tr><td>{phase}</td><td>{html.escape(op)}</td><td>{int(s['count'])}</td>"
                   f"<td>{s['bytes'] / 1e3:.1f}</td></tr>"
                   for phase, ops in result.comm.items() for op, s in ops.items())
    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    texts = "".join(f"<li><code>{html.escape(t)}</code></li>" for t in result.texts)
    return (f"<b>tp={result.tp} on {result.backend}, batch {len(result.prompts)}, prompt lengths "
            f"{[len(p) for p in result.prompts]}</b>: tokens equal tp=1's: <b>{result.matches_tp1}</b>; "
            f"TTFT {result.ttft_ms:.1f} ms, decode {ms(result.ms_per_token)} ms/token against "
            f"{ms(result.baseline_ms_per_token)} ms/token at tp=1 (both measured just now on this machine)"
            f"<p>prompt | new tokens:</p><ul>{texts}</ul>"
            f"<table><tr><th>rank</th><th>weights MB</th><th>KV cache kB</th></tr>{rows}</table>"
            f"<table><tr><th>phase</th><th>op</th><th>count (rank 0)</th><th>kB</th></tr>{comm}</table>")


class TPExperiment:
    """Widgets for tp, backend, batch and prompt length; every change reruns :func:`run_experiment`."""

    def __init__(self, tp: int = 2, backend: str = "threads", batch: int = 2, prompt_len: int = 16,
                 max_new_tokens: int = 8, model_dir: str | Path = TINY_DIR):
        self.model_dir, self.max_new_tokens = model_dir, max_new_tokens
        self.tp = w.Dropdown(options=[t for t in resolve_model(model_dir).valid_tp() if t <= 8], value=tp, description="TP degree")
        self.backend = w.ToggleButtons(options=list(BACKENDS), value=backend, description="backend")
        self.batch = w.IntSlider(value=batch, min=1, max=MAX_BATCH, description="batch")
        self.prompt_len = w.IntSlider(value=prompt_len, min=1, max=128, description="prompt tokens")
        self.view = w.HTML()  # an HTML widget, not an Output widget: see tplab.lab.explorer
        self.last_result: ExperimentResult | None = None
        self.error: str | None = None
        self.widget = w.VBox([self.tp, self.backend, self.batch, self.prompt_len, self.view])
        for control in (self.tp, self.backend, self.batch, self.prompt_len):
            control.observe(lambda change: self.update(), names="value")
        self.update()

    def _ipython_display_(self) -> None:
        display(self.widget)

    def update(self) -> None:
        """Run the experiment for the current choices and show it; a refused choice is shown and kept in ``error``."""
        try:
            self.last_result = run_experiment(self.tp.value, self.backend.value, self.batch.value,
                                              self.prompt_len.value, self.max_new_tokens, self.model_dir)
            self.error = None
        except ValueError as e:
            self.last_result, self.error = None, str(e)
        self.view.value = (f"<b>Not run:</b> {html.escape(self.error)}" if self.error
                           else result_html(self.last_result))
