"""Serving runs measured on real ranks: launching one, its record, and the simulator checked against it.

* :func:`serve_measured`: ``launch(serve_rank_program, ...)`` and rank 0's run.
* :func:`serving_record`: the run as a measurement record (environment, model, tp, backend, scheduler, load,
  summary, per request, per step), appended under ``data/measurements/serving/``.
* :func:`simulator_agreement`: fit the step cost t = a + b·tokens + c·rows + d·attended to the run's measured
  steps (:func:`tplab.serving.step_cost.fit_step_cost`), replay the same requests in the simulator, and
  compare p50 and p95 of TTFT, TPOT and latency: the relative error of each, and their median.
"""
from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import torch

from tplab.bench.env import environment, hardware_slug
from tplab.bench.records import RecordLog, run_file_name
from tplab.comm.launch import launch
from tplab.serving.engine import serve_rank_program
from tplab.serving.metrics import SLO, percentile, percentiles_of
from tplab.serving.requests import Request
from tplab.serving.scheduler import SchedulerConfig
from tplab.serving.simulator import simulate
from tplab.serving.step_cost import LinearStepCost, fit_step_cost
from tplab.specs.model import ModelConfig

AGREEMENT_METRICS = ("ttft_ms", "tpot_ms", "latency_ms")


def serve_measured(model: str | Path | ModelConfig, requests: list[Request], config: SchedulerConfig, tp: int,
                   backend: str = "threads", dtype: torch.dtype | str | None = None, slo: SLO = SLO(),
                   threads: int | None = None, timeout: float = 600.0, concurrency: int | None = None,
                   pp: int = 1, pp_layers: list[int] | None = None, ep: int = 1,
                   expert_dispatch: str = "all-reduce", prepack: bool = False,
                   compiled_attention: bool = False) -> dict:
    """Serve ``requests`` on ``tp`` x ``pp`` real ranks; rank 0's run (requests, summary, steps, comm), and
    ``stage_idle``: each stage's share of the run blocked in its pipeline group (rank 0 of the stage; None at pp 1).
    ``concurrency``: a closed loop of that many requests in flight; ``pp_layers``: decoder layers per stage;
    ``ep``, ``expert_dispatch``: a mixture's experts whole on the tp ranks (:mod:`tplab.model.moe`); ``prepack``:
    the linears in oneDNN's layout (CPU); ``compiled_attention``: the decodes' attention through the compiled
    paged-attention kernel (:func:`tplab.engine.runner.compiled_paged_attention`)."""
    results = launch(serve_rank_program, tp, backend, pp=pp, ep=ep, timeout=timeout, threads=threads,
                     kwargs=dict(model=model, requests=requests, config=config, dtype=dtype, slo=slo,
                                 concurrency=concurrency, pp_layers=pp_layers, expert_dispatch=expert_dispatch,
                                 prepack=prepack, compiled_attention=compiled_attention))
    return {**results[0], "backend": backend, "stage_idle": [r["stage_idle"] for r in results[::tp]]}


def serving_record(run: dict, model: str, config: SchedulerConfig, load: dict, dtype: str) -> dict:
    """The run as a record: ``kind`` measured, with its environment, every step as [tokens, rows, attended, s] and
    the KV blocks in use after each step as [time s, fraction]."""
    return {
        "schema": "tplab.serving/1", "run_id": uuid.uuid4().hex[:8], "kind": "measured",
        "env": environment(run["device"]), "model": model, "tp": run["tp"], "pp": run["pp"], "backend": run["backend"],
        "dtype": dtype, "threads_per_rank": run["threads"], "scheduler": dataclasses.asdict(config), "load": load,
        "summary": run["summary"], "requests": run["requests"],
        "steps": [[s["tokens"], s["rows"], s["attended"], s["seconds"]] for s in run["steps"]],
        "kv_utilization": [[round(t, 4), round(used, 4)] for t, used in run["utilization"]],
        "comm": run["comm"], "pipeline_comm": run["pipeline_comm"], "expert_comm": run["expert_comm"],
        "stage_idle": run["stage_idle"],
        "cache_bytes_per_rank": run["cache_bytes_per_rank"], "scheduler_s": run.get("scheduler_s"),
    }


def write_serving_record(record: dict, out: str | Path) -> Path:
    """Append ``record`` to ``out`` (a .jsonl file) or to a new run file in the folder ``out``/serving."""
    out = Path(out)
    path = out if out.suffix == ".jsonl" else out / "serving" / run_file_name(
        record["env"], "serving", record["run_id"], hardware_slug(record["env"]))
    RecordLog(path).append(record)
    return path


def simulator_agreement(run: dict, requests: list[Request], config: SchedulerConfig,
                        cost: LinearStepCost | None = None) -> dict:
    """The simulator against a measured run: {cost, simulated, measured, errors (relative, per metric and
    percentile), median_error}. ``cost``: a step cost fitted elsewhere (default: to this run's own steps)."""
    cost = cost or fit_step_cost(run["steps"])
    simulated = simulate(requests, config, cost).to_dict()
    errors, table = {}, {}
    for metric in AGREEMENT_METRICS:
        measured, modelled = percentiles_of(run["requests"], metric), percentiles_of(simulated["requests"], metric)
        table[metric] = {"measured": measured, "simulated": modelled}
        for q, value in measured.items():
            if value:
                errors[f"{metric} {q}"] = abs(modelled[q] - value) / value
    ordered = sorted(errors.values())
    return {"cost": dataclasses.asdict(cost), "percentiles": table, "errors": errors,
            "median_error": percentile(ordered, 50), "max_error": max(ordered, default=None)}
