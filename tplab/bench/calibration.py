"""Recalibrate the cost model's efficiencies from GPU measurements, and record where each value came from.

``data/efficiency.json`` holds *assumed* fractions of the datasheet peaks.
Given measurement records of one GPU model (:mod:`tplab.bench.records`),
:func:`calibrate` finds the fractions that make :mod:`tplab.perf.estimate` reproduce
them, using the cost model's own byte and FLOP counts
(:func:`tplab.perf.shapes.step_work`) for the layers that were built:

* ``memory_bandwidth``, from decode steps the cost model calls memory-bound:
  f = (W + KV) / (t · B_peak), t the step's measured time without collectives.
* ``compute``, from prefills the cost model calls compute-bound:
  f = FLOPs / (t · F_peak), t the prefill's time without collectives.
* ``link``, from collectives that were *measured* (real ranks, tp > 1; never
  emulated ones, whose time is the model's own). A prefill's collectives take
  t = A + B/f with A = Σ count·(base + k(n-1)α) and B = Σ k(n-1)S/(nβ)
  (k = 2 for an all-reduce, 1 for an all-gather; S the bytes of all calls),
  so f = B / (t - A); a record whose t ≤ A (latency alone explains it) is skipped.

Each value is the median over the records that qualify, capped at 1, with
its provenance: files, device, dates, commits, the number of records and
the spread. CPU records are refused: a CPU's fractions say nothing about a
GPU. :func:`write_efficiency` writes a file of data/efficiency.json's shape
that ``estimate(..., efficiency=FILE)`` and ``python -m tplab plan
--efficiency FILE`` load; factors that could not be calibrated are left out,
so they keep their defaults.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from tplab.bench.records import record_shapes
from tplab.files import write_new_file
from tplab.perf.estimate import bound, compute_dtype_for, overhead_seconds
from tplab.perf.shapes import step_work
from tplab.specs.efficiency import EFFICIENCY_FILE as DEFAULTS_FILE
from tplab.specs.efficiency import load_efficiency
from tplab.specs.hardware import GpuSpec, gpu_for_device, load_gpu

RING_FACTOR = {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1}


def _check_hardware(records: list[dict], gpu: GpuSpec) -> str:
    """The one GPU the records were taken on; ValueError for CPU records, mixed devices, or another GPU model."""
    if not records:
        raise ValueError("no measurement records to calibrate from")
    devices = {(r["env"]["device"]["type"], r["env"]["device"]["name"]) for r in records}
    if any(kind != "cuda" for kind, _ in devices):
        raise ValueError("CPU measurements cannot calibrate a GPU's efficiencies (they measure a different machine); "
                         "pass records taken on the GPU named by --gpu")
    if len(devices) > 1:
        raise ValueError(f"records come from several devices {sorted(n for _, n in devices)}: calibrate one at a time")
    name = next(iter(devices))[1]
    spec = gpu_for_device(name)
    if spec is None:
        raise ValueError(f"the records were taken on {name!r}, a name no GPU of data/hardware/gpus lists in its "
                         "device_names: add it to the spec of that part (or a new spec) to calibrate it")
    if spec != gpu.name:
        raise ValueError(f"the records were taken on {name!r}, not on a {gpu.label}: pass --gpu {spec}")
    return name


def _memory_fraction(record: dict, gpu: GpuSpec, eff) -> float | None:
    x = record_shapes(record)
    if x.dtype is None or record["decode_compute_ms"] is None:
        return None
    work = step_work(x.spec, x.tp, x.dtype, "bf16", x.batch, 1, x.decode_context, layers=x.layers)
    if bound(work, gpu, compute_dtype_for(gpu, x.dtype)[0], eff) != "memory":
        return None
    seconds = record["decode_compute_ms"]["median"] / 1e3 - sum(overhead_seconds(work, eff, "graph").values())
    return (work.weight_bytes + work.kv_bytes) / (seconds * gpu.memory_bandwidth_gb_s * 1e9) if seconds > 0 else None


def _compute_fraction(record: dict, gpu: GpuSpec, eff) -> float | None:
    x = record_shapes(record)
    if x.dtype is None or record["ttft_compute_ms"] is None:
        return None
    work = step_work(x.spec, x.tp, x.dtype, "bf16", x.batch, x.prompt_len, 0, layers=x.layers)
    compute_dtype = compute_dtype_for(gpu, x.dtype)[0]
    if bound(work, gpu, compute_dtype, eff) != "compute":
        return None
    seconds = record["ttft_compute_ms"]["median"] / 1e3 - sum(overhead_seconds(work, eff, "graph").values())
    # t = F_lin / (P·c·n/(n + n½)) + F_att / (P_bf16·c), solved for c
    size = (work.tokens + eff.gemm_half_tokens) / work.tokens
    flop_seconds = (work.linear_flops * size / (gpu.tflops(compute_dtype) * 1e12)
                    + work.attention_flops / (gpu.tflops("bf16") * 1e12))
    return flop_seconds / seconds if seconds > 0 else None


def _link_fraction(record: dict, gpu: GpuSpec, eff, interconnect: str | None) -> float | None:
    tp = record["setting"]["tp"]
    if record["kind"] != "measured" or tp == 1 or record["ttft_comm_ms"] is None:
        return None
    link = gpu.link(interconnect, tp)
    alpha, beta, base = link.alpha_us * 1e-6, link.bandwidth_gb_s * 1e9, eff.collective_base_us * 1e-6
    latency = bandwidth = 0.0
    for op, s in record["comm"]["prefill"].items():
        k = RING_FACTOR.get(op)
        if k is None:
            return None
        latency += s["count"] * (base + k * (tp - 1) * alpha)
        bandwidth += k * (tp - 1) * s["bytes"] / (tp * beta)
    seconds = record["ttft_comm_ms"] / 1e3
    return bandwidth / (seconds - latency) if seconds > latency else None


def _entry(values: list[float], what: str, records: list[dict], device: str) -> dict:
    raw = statistics.median(values)
    files = sorted({r.get("source_file", "?") for r in records})
    dates = sorted({r["env"]["date"][:10] for r in records})
    commits = sorted({(r["env"]["git"]["commit"] or "unknown")[:10] for r in records})
    capped = f"; the median {raw:.3g} exceeds 1 and is capped at 1" if raw > 1 else ""
    return {"value": min(raw, 1.0), "raw_median": raw, "min": min(values), "max": max(values), "records": len(values),
            "provenance": f"calibrated by tplab.bench.calibration: median over {len(values)} {what} of {device}, from "
                          f"{', '.join(files)} ({', '.join(dates)}; tplab commits {', '.join(commits)}); "
                          f"range {min(values):.3g}-{max(values):.3g}{capped}"}


def calibrate(records: list[dict], gpu: str | GpuSpec, interconnect: str | None = None) -> dict:
    """Efficiency entries fitted to ``records`` of the GPU ``gpu`` (see the module docstring).

    Returns a dict of data/efficiency.json's shape: "about" plus one
    {"value", "provenance", ...} entry per factor that some record could calibrate.
    """
    hw = load_gpu(gpu)
    device = _check_hardware(records, hw)
    eff = load_efficiency()
    fits = {
        "memory_bandwidth": ([_memory_fraction(r, hw, eff) for r in records], "memory-bound decode steps"),
        "compute": ([_compute_fraction(r, hw, eff) for r in records], "compute-bound prefills"),
        "link": ([_link_fraction(r, hw, eff, interconnect) for r in records], "measured prefill collectives"),
    }
    out: dict = {"about": f"Efficiencies calibrated for {hw.label} ({hw.name}) from measurements on {device}. "
                          "Valid for this GPU only; factors absent here keep data/efficiency.json's defaults."}
    for key, (values, what) in fits.items():
        used = [(v, r) for v, r in zip(values, records) if v is not None and v > 0]
        if used:
            out[key] = _entry([v for v, _ in used], what, [r for _, r in used], device)
    if len(out) == 1:
        raise ValueError("no record could calibrate any factor: need bf16/fp16 records with decode or prefill "
                         "compute times (emulated or measured), or measured collectives at tp > 1")
    return out


def write_efficiency(calibrated: dict, path: str | Path, force: bool = False) -> Path:
    """Write the calibrated entries as a JSON override file, atomically, once the cost model loads it.

    An existing file is replaced only with ``force``; the shipped defaults
    (data/efficiency.json), which every estimate starts from, never: a
    calibration is an override, loaded with ``--efficiency FILE``.
    """
    path = Path(path)
    if path.resolve() == DEFAULTS_FILE.resolve():
        raise ValueError(f"{path} holds the defaults every estimate starts from; write the calibration to another "
                         "file and load it with --efficiency FILE")
    return write_new_file(path, json.dumps(calibrated, indent=2) + "\n", force=force, validate=load_efficiency)
