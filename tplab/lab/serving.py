"""What notebook 08 runs: serving experiments on CPU ranks (measured), and 70B deployments (simulated, modelled).

Each function is one experiment of the notebook, small enough to run in seconds
on two cores; the engine, the scheduler and the simulator they call are the
package's own (:mod:`tplab.serving.engine`, :mod:`tplab.serving`).
:class:`ServingExplorer` puts the simulated deployment behind widgets: every
change reruns :func:`simulate_deployment` and keeps its ``result`` (or
``error``) on the object, so tests can set a widget's value and assert on it.
"""
from __future__ import annotations

import dataclasses
import html
import statistics

import ipywidgets as w

from tplab.bench.serving import serve_measured, simulator_agreement
from tplab.perf.batch import ModelledStepCost
from tplab.perf.estimate import MODELLED
from tplab.serving.load import synthetic_load
from tplab.serving.metrics import percentiles_of
from tplab.serving.requests import Request
from tplab.serving.scheduler import SchedulerConfig
from tplab.serving.simulator import simulate
from tplab.serving.step_cost import fit_step_cost
from tplab.specs.model import resolve_model
from tplab.specs.tiny import TINY_DIR

TINY = resolve_model("tiny")
SPECIAL = frozenset(TINY.eos_token_ids) | {0}
DEPLOYMENT = dict(model="llama-3-70b", gpu="h100-sxm", context=8192, prompt_len=(1024, 6144), output_len=(128, 512),
                  max_batched_tokens=8192, block_size=16)


def tiny_load(num_requests: int, rate: float | None, prompt_len=(16, 128), output_len=(8, 48), seed: int = 0,
              prefix_share: float = 0.0) -> list[Request]:
    """Requests for the bundled tiny model (its special ids left out of the prompts)."""
    return synthetic_load(num_requests, rate, prompt_len, output_len, TINY.vocab_size, seed, prefix_share,
                          special_ids=SPECIAL)


def with_(config: SchedulerConfig, **changes) -> SchedulerConfig:
    return dataclasses.replace(config, **changes)


def serve_tiny(requests: list[Request], config: SchedulerConfig, tp: int = 1) -> dict:
    """The tiny model serving ``requests`` on ``tp`` thread ranks of one torch thread each (measured): a step of the
    tiny model is too small to share among threads, and a rank of one thread is never stalled waiting for a
    team-mate that a busy machine has descheduled."""
    return serve_measured(TINY_DIR, requests, config, tp, threads=1)


def measured_policies(requests: list[Request], config: SchedulerConfig, tp: int = 1,
                      policies: tuple[str, ...] = ("padded", "static", "continuous")) -> dict[str, dict]:
    """The same requests served by each batching policy on ``tp`` thread ranks (measured)."""
    return {policy: serve_tiny(requests, with_(config, policy=policy), tp) for policy in policies}


def cap_sweep(requests: list[Request], config: SchedulerConfig, caps: list[int], tp: int = 1) -> dict[int, dict]:
    """The same requests under each admission cap ``max_num_seqs`` (measured)."""
    return {cap: serve_tiny(requests, with_(config, max_num_seqs=cap), tp) for cap in caps}


def long_prompt_burst(short: int = 4, long: int = 3, long_len: int = 200) -> list[Request]:
    """Short chats decoding (8-token prompts, 40 outputs, at t=0) while ``long`` prompts of ``long_len`` tokens
    arrive 50 ms apart: the load where a whole-prompt prefill stalls every decode behind it."""
    base = tiny_load(short + long, None, (8, 8), (40, 40), seed=11)
    long_prompts = tiny_load(long, None, (long_len, long_len), (2, 2), seed=12)
    return [*base[:short], *(Request(short + i, r.prompt, r.max_new_tokens, 0.05 * (i + 1))
                             for i, r in enumerate(long_prompts))]


def chunking_comparison(requests: list[Request], config: SchedulerConfig, chunk: int, tp: int = 1) -> dict[str, dict]:
    """Whole-prompt prefill (one step per prompt) against chunks of ``chunk`` tokens batched with the decodes."""
    return {"whole prompts": serve_tiny(requests, with_(config, chunked_prefill=False,
                                                    max_num_batched_tokens=config.max_model_len), tp),
            f"chunks of {chunk}": serve_tiny(requests, with_(config, max_num_batched_tokens=chunk), tp)}


def simulator_check(config: SchedulerConfig, loads: list[float], num_requests: int = 32, tp: int = 1) -> dict:
    """Fit the step cost to one measured run (all requests at once), then compare the simulator with the engine
    at Poisson rates of ``loads`` times the requests/s that run served: {"cost", "rates": {rate: agreement}} (see
    :func:`~tplab.bench.serving.simulator_agreement`). Rates set by the machine's own measured pace stay below
    saturation on a slow or busy machine too, where a queue would amplify every difference of timing."""
    at_once = tiny_load(num_requests, None, seed=100)
    calibration = serve_tiny(at_once, config, tp)
    cost = fit_step_cost(calibration["steps"])
    served = calibration["summary"]["throughput_tok_s"] / statistics.fmean(r.max_new_tokens for r in at_once)
    out = {}
    for i, load in enumerate(loads):
        rate = round(load * served, 1)
        requests = tiny_load(num_requests, rate, seed=i)
        out[rate] = simulator_agreement(serve_tiny(requests, config, tp), requests, config, cost)
    return {"cost": cost, "rates": out}


def simulate_deployment(rate: float, tp: int, dtype: str, cap: int, interconnect: str | None = None,
                        num_requests: int = 60, seed: int = 0, replicas: int = 1) -> dict:
    """Llama-3-70B on H100s (modelled): prompts 1-6K tokens, 128-512 outputs, Poisson at ``rate`` requests/s,
    at most ``cap`` sequences at once, 8K context, the KV blocks the GPUs' memory leaves. ``replicas`` groups
    share the load evenly (each sees rate / replicas); the summary is one group's, with throughput for all.
    ValueError when the weights leave no room for a KV cache."""
    d = DEPLOYMENT
    cost = ModelledStepCost(d["model"], d["gpu"], tp, dtype, interconnect=interconnect)
    config = SchedulerConfig(max_num_seqs=cap, max_num_batched_tokens=d["max_batched_tokens"],
                             block_size=d["block_size"], max_model_len=d["context"],
                             num_blocks=cost.kv_blocks(d["block_size"], cap, d["max_batched_tokens"]))
    requests = synthetic_load(num_requests, rate / replicas, d["prompt_len"], d["output_len"],
                              resolve_model(d["model"], strict=False).vocab_size, seed)
    run = simulate(requests, config, cost)
    summary = run.summary
    p95 = {m: percentiles_of(run.requests, m, (95,))["p95"] for m in ("ttft_ms", "tpot_ms", "latency_ms")}
    return {**summary, "p95": p95, "throughput_tok_s": summary["throughput_tok_s"] * replicas, "label": MODELLED,
            "gpus": tp * replicas, "tp": tp, "dtype": dtype, "cap": cap, "rate": rate, "replicas": replicas,
            "interconnect": cost.link.name, "num_blocks": config.num_blocks}


class ServingExplorer:
    """Widgets for rate, tp, precision and cap over :func:`simulate_deployment`; ``widget`` is what is displayed."""

    def __init__(self, rate: float = 2.0, tp: int = 4, dtype: str = "fp8", cap: int = 24, num_requests: int = 40):
        style = {"description_width": "130px"}
        self.rate = w.FloatSlider(value=rate, min=0.5, max=8.0, step=0.5, description="requests/s", style=style,
                                  continuous_update=False)
        self.tp = w.Dropdown(options=[2, 4, 8], value=tp, description="TP degree", style=style)
        self.dtype = w.ToggleButtons(options=["bf16", "fp8"], value=dtype, description="weights", style=style)
        self.cap = w.IntSlider(value=cap, min=1, max=128, description="max_num_seqs", style=style,
                               continuous_update=False)
        self.summary = w.HTML()
        self.num_requests, self.result, self.error = num_requests, None, None
        for control in (self.rate, self.tp, self.dtype, self.cap):
            control.observe(lambda _: self.update(), names="value")
        self.widget = w.VBox([w.HBox([self.rate, self.tp]), w.HBox([self.dtype, self.cap]), self.summary])
        self.update()

    def update(self) -> None:
        try:
            self.result = simulate_deployment(self.rate.value, self.tp.value, self.dtype.value, self.cap.value,
                                              num_requests=self.num_requests)
            self.error = None
        except ValueError as e:
            self.result, self.error = None, str(e)
            self.summary.value = f"<b>does not run:</b> {html.escape(self.error)}"
            return
        r = self.result
        self.summary.value = (
            f"<b>[{MODELLED}]</b> Llama-3-70B, TP{r['tp']} {r['dtype']} on H100 over {r['interconnect']}, "
            f"cap {r['cap']}, {r['rate']:g} req/s: {r['throughput_tok_s']:.0f} output tok/s; TTFT p50 "
            f"{r['ttft_ms']['p50']:.0f} ms, p90 {r['ttft_ms']['p90']:.0f} ms; TPOT p50 {r['tpot_ms']['p50']:.1f} ms, "
            f"p99 {r['tpot_ms']['p99']:.1f} ms; {r['preemptions']} preemptions")
