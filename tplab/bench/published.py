"""Published GPU measurements (``data/published/``) and what the cost model predicts for each of them.

Every figure is one measured number from a public source: its metric
(``decode_ms_per_token``, ``ttft_ms`` or ``throughput_tok_s``), value, model (a
shipped config of ``data/model_configs``), GPU (a shipped spec), interconnect,
tp, batch (or concurrency), prompt and output lengths, dtype, engine and its
profile (``graph``: CUDA graphs or a compiled engine; ``eager``), the source
(title, where it is published, the commit of the file) and notes.

``figures.jsonl`` feeds the fit (:mod:`tplab.bench.fit`). ``held_out_70b.jsonl``
holds the Llama-2-70B and Llama-3-70B figures, which never enter a fit, so that
what the model says of 70B deployments is a prediction. ``held_out_moe.jsonl`` holds Mixtral 8x7B's, held out
too: each carries the ``routing`` it was measured under (:class:`tplab.perf.experts.ExpertSplit`).

:func:`predict` evaluates :func:`tplab.perf.estimate` at a figure's setting:
a decode step at context P + O/2, the prefill of the batch, or the static
batch's throughput B·O / (TTFT + (O-1)·t). The KV cache is taken in the
figure's precision (an FP8 engine is taken to keep an FP8 cache).

``tp_vs_pp.jsonl`` holds published comparisons of TP and PP on the same GPUs: a ratio between two (tp, pp)
setups, or the order of several. :func:`model_tp_vs_pp` answers each in its own terms: a batch-1 decode speed
from :func:`tplab.perf.pipeline.estimate_pipeline`, or a throughput or p90 latency under the comparison's load from
the serving simulator with pp steps in flight (:func:`tplab.perf.batch.simulate_on`). What each comparison leaves
unsaid (lengths, precision) is assumed and written in its notes.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from tplab.paths import DATA_DIR
from tplab.perf.batch import ModelledStepCost, simulate_on, vllm_batch_defaults
from tplab.perf.estimate import Estimate, estimate
from tplab.perf.pipeline import estimate_pipeline
from tplab.serving.load import synthetic_load
from tplab.serving.scheduler import SchedulerConfig
from tplab.specs.efficiency import Efficiency
from tplab.specs.hardware import GpuSpec, load_gpu
from tplab.specs.model import ModelConfig, resolve_model

PUBLISHED_DIR = DATA_DIR / "published"
FIGURES_FILE = PUBLISHED_DIR / "figures.jsonl"
HELD_OUT_FILE = PUBLISHED_DIR / "held_out_70b.jsonl"
HELD_OUT_MOE_FILE = PUBLISHED_DIR / "held_out_moe.jsonl"
TP_VS_PP_FILE = PUBLISHED_DIR / "tp_vs_pp.jsonl"
METRICS = ("decode_ms_per_token", "ttft_ms", "throughput_tok_s")
HELD_OUT_MODELS = ("llama-2-70b", "llama-3-70b", "llama-3.1-70b")


def load_figures(path: str | Path = FIGURES_FILE) -> list[dict]:
    """The figures of a JSON-lines file, each checked to name a known metric."""
    figures = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for f in figures:
        if f["metric"] not in METRICS:
            raise ValueError(f"{path}: figure {f['id']} has metric {f['metric']!r}; known: {', '.join(METRICS)}")
    return figures


@functools.lru_cache(maxsize=None)
def _model(name: str) -> ModelConfig:
    return resolve_model(name, strict=False)


@functools.lru_cache(maxsize=None)
def _gpu(name: str) -> GpuSpec:
    return load_gpu(name)


def modelled(figure: dict, efficiency: Efficiency, routing: str | None = None) -> Estimate:
    """The cost model's estimate at a figure's setting (a mixture's under ``routing``, default the figure's)."""
    return estimate(model=_model(figure["model"]), gpu=_gpu(figure["gpu"]), tp=figure["tp"], dtype=figure["dtype"],
                    kv_dtype=figure["dtype"], batch=figure["batch"], prompt_len=figure["prompt_len"],
                    output_len=figure["output_len"], interconnect=figure["interconnect"], efficiency=efficiency,
                    engine=figure["engine_profile"], routing=routing or figure.get("routing", "uniform"))


def predict(figure: dict, efficiency: Efficiency, routing: str | None = None) -> float:
    """The modelled value of the figure's metric, in the figure's unit."""
    return getattr(modelled(figure, efficiency, routing), figure["metric"])


def source_key(figure: dict) -> str:
    """A figure's group for cross-validation: its source and its model (leaving one out tests an unseen model)."""
    return f"{figure['engine']} / {figure['model']}"


PEER_SCORES_FILE = PUBLISHED_DIR / "peer_scores.jsonl"


def peer_pairs(figures: list[dict], path: str | Path = PEER_SCORES_FILE) -> dict[tuple[str, str], list[tuple[dict, float]]]:
    """{(peer, setting): [(figure, the peer's prediction)]} for the given figures, from ``scripts/score_peers.py``'s
    file; a figure a peer could not predict is left out of its list (its row says why, under ``why_not``)."""
    by_id = {f["id"]: f for f in figures}
    out: dict[tuple[str, str], list[tuple[dict, float]]] = {}
    for line in Path(path).read_text().splitlines()[1:]:
        row = json.loads(line)
        if row["figure"] in by_id and row["value"] is not None:
            out.setdefault((row["peer"], row["setting"]), []).append((by_id[row["figure"]], row["value"]))
    return out



def load_tp_vs_pp(path: str | Path = TP_VS_PP_FILE) -> list[dict]:
    """The published TP-against-PP comparisons."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _setup_value(comparison: dict, tp: int, pp: int) -> float:
    """The model's value of ``comparison["metric"]`` for one (tp, pp) setup."""
    model, gpu, dtype, load = _model(comparison["model"]), _gpu(comparison["gpu"]), comparison["dtype"], comparison["load"]
    if comparison["metric"] == "decode_tok_s_per_user":
        e = estimate_pipeline(model=model, gpu=gpu, tp=tp, pp=pp, micro_batches=1, batch=1, dtype=dtype, kv_dtype=dtype,
                              network=None, prompt_len=load["prompt_len"], output_len=load["output_len"])
        return 1000 / e.decode_ms_per_token
    cost = ModelledStepCost(model, gpu, tp, dtype, dtype, pp=pp)
    requests = synthetic_load(load["num_requests"], load["rate"], tuple(load["prompt_len"]), tuple(load["output_len"]),
                              model.vocab_size, seed=0)
    seqs, tokens = vllm_batch_defaults(gpu)
    longest = load["prompt_len"][1] + load["output_len"][1]
    config = SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=tokens, block_size=16, max_model_len=longest,
                             num_blocks=cost.kv_blocks(16, seqs, tokens))
    summary = simulate_on(cost, requests, config).summary
    return summary["throughput_tok_s"] if comparison["metric"] == "throughput_tok_s" else \
        summary["latency_ms"]["p90"] / 1000


def model_tp_vs_pp(comparison: dict) -> dict:
    """{"setups": [(tp, pp, published value or None, modelled value)], "published", "modelled"}: for a ratio, the
    first setup's value over the second's; for an order, the setups sorted by value, as "tpXppY" labels (a
    published None, a rate that could not be sustained, sorts last)."""
    rows = [(s["tp"], s["pp"], s.get("value"), _setup_value(comparison, s["tp"], s["pp"])) for s in comparison["setups"]]
    if comparison["compare"] == "ratio":
        return {"setups": rows, "published": comparison["value"], "modelled": rows[0][3] / rows[1][3]}
    label = lambda r: f"tp{r[0]}pp{r[1]}"  # noqa: E731
    published = sorted(rows, key=lambda r: float("inf") if r[2] is None else r[2])
    return {"setups": rows, "published": [label(r) for r in published],
            "modelled": [label(r) for r in sorted(rows, key=lambda r: r[3])]}
