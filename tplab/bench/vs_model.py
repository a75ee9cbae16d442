"""GPU records beside the cost model's figures for the same points, on the GPU that took them.

A record taken on a GPU that a spec of ``data/hardware/gpus`` names
(:func:`tplab.specs.hardware.gpu_for_device`) is set beside :func:`tplab.perf.estimate`
at the record's point: the same model with all its layers, tp, batch and
prompt length, ``decode_steps`` new tokens (so the model's mean context is
about that of the timed steps), the record's dtype and, for an emulated
record, the link its collectives were modelled on.

The record's side is the whole model too
(:func:`tplab.bench.records.full_model_ms`): its extrapolation to all layers
(``scaled``, arithmetic on a measurement, labelled so) where fewer were
built, its medians otherwise. Both sides include the
collectives: measured on real ranks, modelled for an emulated one.

The ratio measured / modelled is what calibration (:mod:`tplab.bench.calibration`)
turns into efficiencies; here it is shown (:func:`tplab.plots.measurements.plot_against_model`), not fitted.
"""
from __future__ import annotations

from collections import defaultdict

from tplab.bench.records import modelled_precision
from tplab.perf.estimate import Estimate, estimate
from tplab.specs.hardware import gpu_for_device
from tplab.specs.model import ModelConfig


def modelled_for(record: dict, efficiency=None) -> Estimate | None:
    """The cost model at the record's point on the record's GPU; None for a CPU, an unknown GPU or float32."""
    device, setting = record["env"]["device"], record["setting"]
    gpu = gpu_for_device(device["name"]) if device["type"] == "cuda" else None
    dtype = modelled_precision(setting["dtype"])
    if gpu is None or dtype is None:
        return None
    link = setting.get("link") or {}
    return estimate(model=ModelConfig.from_dict(record["model"]["config"], strict=False, name=record["model"]["name"]), gpu=gpu,
                    tp=setting["tp"], dtype=dtype, kv_dtype=dtype, batch=setting["batch"],
                    prompt_len=setting["prompt_len"], output_len=setting["decode_steps"],
                    interconnect=link.get("interconnect"), efficiency=efficiency)


def by_gpu(records: list[dict], efficiency=None) -> dict[str, list[tuple[dict, Estimate]]]:
    """{GPU spec name: [(record, the model at its point)]} for every record the cost model can place."""
    out: dict[str, list[tuple[dict, Estimate]]] = defaultdict(list)
    for r in records:
        e = modelled_for(r, efficiency)
        if e is not None:
            out[e.gpu].append((r, e))
    return dict(out)
