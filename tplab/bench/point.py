"""One benchmark point: what a rank times (:func:`run_points`) and the record it becomes (:func:`point_record`).

A point is (tp, batch, prompt_len). The rank times it (:mod:`tplab.bench.timing`),
notes its memory and the bytes a decode step reads; the main process adds the
collectives' cost (measured, or modelled for an emulated rank), the
extrapolation to all layers, the roofline and the HF baseline, and writes one
record (fields: :mod:`tplab.bench.records`).

Memory per rank: on a GPU, ``torch.cuda.max_memory_allocated`` over the
point; on a CPU there is no per-rank allocator high-water, so the record
gives the bytes of weights + KV cache allocated (exact, from the tensors)
and, separately, the process's peak RSS (``resource.getrusage``: every rank
of the threads backend shares that process).
"""
from __future__ import annotations

import resource
import statistics
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from tplab.bench.emulation import CommModel
from tplab.bench.models import hf_class_name
from tplab.bench.records import SCHEMA, label, record_shapes, scale_to_full, spread, throughput
from tplab.bench.roofline import decode_bytes
from tplab.bench.timing import Timing, time_edges, time_tplab
from tplab.comm.stats import CommStats
from tplab.model.decoder import TPCausalLM
from tplab.model.routing import routing_summary
from tplab.perf.shapes import rank_params, step_work
from tplab.specs.model import ModelConfig


@dataclass(frozen=True)
class PointInputs:
    """How every point of a sweep is timed."""

    decode_steps: int
    repeats: int
    warmup: int
    mode: str
    seed: int
    threads: int | None = None  # torch intra-op threads per rank process (None: torch's default)


def prompts(batch: int, prompt_len: int, vocab_size: int, seed: int, device: torch.device) -> torch.Tensor:
    """(batch, prompt_len) token ids, different in every row, the same on every rank (one seed)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=generator).to(device)


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def run_points(model: TPCausalLM, points: list[tuple[int, int]], inputs: PointInputs,
               on_point: Callable[[], None] | None = None) -> list[dict]:
    """Time every (batch, prompt_len) on this rank's model: timing, edges, memory, decode bytes."""
    device, out = model.device, []
    for batch, prompt_len in points:
        ids = prompts(batch, prompt_len, model.config.vocab_size, inputs.seed, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        routed = model.expert_tokens()
        timing = time_tplab(model, ids, inputs.decode_steps, inputs.repeats, inputs.warmup, inputs.mode)
        per_token = model.config.kv_bytes_per_token(model.dist.world_size, model.dtype)
        cache_bytes = per_token * batch * (prompt_len + inputs.decode_steps)
        memory = {"weights_bytes": model.parameter_bytes(), "kv_cache_bytes": cache_bytes,
                  "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                  "process_peak_rss_bytes": _peak_rss_bytes()}
        context = prompt_len + (inputs.decode_steps if inputs.mode != "eager" else (inputs.decode_steps + 1) / 2)
        out.append({"batch": batch, "prompt_len": prompt_len, "timing": timing, "memory": memory,
                    "torch_threads": torch.get_num_threads(),
                    "edges": time_edges(model, batch, prompt_len), "decode_bytes": decode_bytes(model, batch, context),
                    "expert_tokens": None if routed is None else (model.expert_tokens() - routed).tolist()})
        if on_point is not None:
            on_point()
    return out


def _phase_comm(t: Timing, comm_model: CommModel | None, tp: int) -> tuple[str, dict, dict, list | None, list | None]:
    """(source, prefill summary, decode-step summary, prefill seconds per repeat, decode-step seconds per repeat)."""
    if comm_model is not None:
        prefill, decode = comm_model.summary(t.prefill_records, tp), comm_model.summary(t.decode_step_records, tp)
        pre = sum(s["seconds"] for s in prefill.values())
        dec = sum(s["seconds"] for s in decode.values())
        return f"modelled: {comm_model.label}", prefill, decode, [pre] * len(t.ttft_s), [dec] * len(t.ttft_s)
    prefill, decode = CommStats(records=t.prefill_records).summary(), CommStats(records=t.decode_step_records).summary()
    measured = "measured: wall time of each collective on rank 0 (dist.stats)"
    if not t.comm_timed:
        return (f"{measured}, in the prefill; decode: not timed, captured in the CUDA graph, inside the step time",
                prefill, decode, t.prefill_comm_s, None)
    return measured, prefill, decode, t.prefill_comm_s, t.decode_comm_step_s


def _times(step_s: list[float], comm_s: list[float] | None, emulated: bool) -> tuple[list, list | None, float | None]:
    """(total ms per repeat, compute ms per repeat or None, median comm ms or None)."""
    if comm_s is None:
        return [1e3 * s for s in step_s], None, None
    if emulated:  # the step ran without collectives: add their modelled time
        return [1e3 * (s + c) for s, c in zip(step_s, comm_s)], [1e3 * s for s in step_s], 1e3 * statistics.median(comm_s)
    return [1e3 * s for s in step_s], [1e3 * (s - c) for s, c in zip(step_s, comm_s)], 1e3 * statistics.median(comm_s)


def point_record(*, kind: str, run_id: str, env: dict, model: dict, setting: dict, raw: dict,
                 comm_model: CommModel | None, baseline: Timing | None, roofline: dict) -> dict:
    """The JSON record of one point (see :mod:`tplab.bench.records` for the fields)."""
    t, tp, batch, steps = raw["timing"], setting["tp"], setting["batch"], setting["decode_steps"]
    setting = {**setting, "torch_threads_per_rank": raw["torch_threads"]}
    source, prefill_comm, decode_comm, pre_s, dec_s = _phase_comm(t, comm_model, tp)
    ttft, ttft_compute, ttft_comm = _times(t.ttft_s, pre_s, kind == "emulated")
    decode, decode_compute, decode_comm_ms = _times(t.decode_step_s, dec_s, kind == "emulated")
    record = {
        "schema": SCHEMA, "run_id": run_id, "kind": kind, "env": env, "model": model, "setting": setting,
        "ttft_ms": spread(ttft), "ttft_compute_ms": None if ttft_compute is None else spread(ttft_compute),
        "ttft_comm_ms": ttft_comm, "decode_ms_per_token": spread(decode),
        "decode_compute_ms": None if decode_compute is None else spread(decode_compute),
        "decode_comm_ms": decode_comm_ms,
        "comm": {"source": source, "prefill": prefill_comm, "decode_step": decode_comm},
        "memory": raw["memory"],
    }
    record.update(_rates(batch, steps, record["ttft_ms"]["median"], record["decode_ms_per_token"]["median"],
                         decode_comm_ms))
    record["scaled"] = _scaled(record, raw)
    record["roofline"] = _roofline(record, raw, roofline)
    record["baseline"] = None if baseline is None else _baseline(record, baseline)
    counts = raw.get("expert_tokens")  # a mixture's pairs per layer and expert over the point's timed passes
    record["routing"] = None if counts is None else routing_summary(torch.tensor(counts)[None], setting["ep"])
    record["label"] = label(record)
    return record


def _rates(batch: int, steps: int, ttft_ms: float, step_ms: float, comm_ms: float | None) -> dict:
    return {"throughput_tok_s": throughput(batch, steps, ttft_ms, step_ms), "decode_tok_s": 1e3 * batch / step_ms,
            "decode_comm_share": None if comm_ms is None else comm_ms / step_ms}


def _compute_or_total(record: dict, phase: str) -> float:
    part = record[f"{phase}_compute_ms"] or record[{"ttft": "ttft_ms", "decode": "decode_ms_per_token"}[phase]]
    return part["median"]


def _scaled(record: dict, raw: dict) -> dict | None:
    """The point extrapolated to every layer of the model, or None when all were built."""
    built, full = record["model"]["layers_built"], record["model"]["layers_full"]
    if built == full:
        return None
    s = record["setting"]
    ttft = scale_to_full(_compute_or_total(record, "ttft"), 1e3 * raw["edges"]["prefill"],
                         record["comm"]["prefill"] if record["ttft_comm_ms"] is not None else {}, built, full)
    decode = scale_to_full(_compute_or_total(record, "decode"), 1e3 * raw["edges"]["decode"],
                           record["comm"]["decode_step"] if record["decode_comm_ms"] is not None else {}, built, full)
    spec = ModelConfig.from_dict(record["model"]["config"], strict=False, name=record["model"]["name"])
    element = raw["memory"]["weights_bytes"] / sum(rank_params(spec, s["tp"], built).values())
    out = {"layers": full, "from_layers": built,
           "note": f"extrapolated from {built} of {full} layers: compute = edges + ({full}/{built})(measured - edges), "
                   "all-reduces x (2L+1)/(2N+1); not a measurement of the full model",
           "ttft_ms": ttft["total_ms"], "ttft_comm_ms": ttft["comm_ms"], "decode_ms_per_token": decode["total_ms"],
           "decode_comm_ms": decode["comm_ms"],
           "weights_bytes": element * sum(rank_params(spec, s["tp"]).values()),
           "kv_cache_bytes": raw["memory"]["kv_cache_bytes"] * full / built}
    out.update(_rates(s["batch"], s["decode_steps"], ttft["total_ms"], decode["total_ms"],
                      decode["comm_ms"] if record["decode_comm_ms"] is not None else None))
    return out


def _roofline(record: dict, raw: dict, roofline: dict) -> dict:
    """Achieved memory bandwidth of a decode step and FLOP/s of the prefill, against the device's measured roofs."""
    ranks, x = record["setting"]["ranks_sharing_memory"], record_shapes(record)
    step_bytes = raw["decode_bytes"]["weights"] + raw["decode_bytes"]["kv_cache"]
    decode_s = _compute_or_total(record, "decode") / 1e3
    work = step_work(x.spec, x.tp, "bf16", "bf16", x.batch, x.prompt_len, 0, layers=x.layers)
    flops = work.linear_flops + work.attention_flops
    achieved_gb_s = ranks * step_bytes / decode_s / 1e9
    achieved_tflops = ranks * flops / (_compute_or_total(record, "ttft") / 1e3) / 1e12
    return {"copy_gb_s": roofline["copy"]["gb_s"], "copy_method": roofline["copy"]["method"],
            "matmul_tflops": roofline["matmul"]["tflops"], "matmul_method": roofline["matmul"]["method"],
            "decode_bytes_per_step": step_bytes, "decode_achieved_gb_s": achieved_gb_s,
            "decode_fraction_of_copy": _below_roof(achieved_gb_s / roofline["copy"]["gb_s"]),
            "prefill_flops": flops, "prefill_achieved_tflops": achieved_tflops,
            "prefill_fraction_of_matmul": _below_roof(achieved_tflops / roofline["matmul"]["tflops"]),
            "ranks_sharing_memory": ranks,
            "note": "bytes: the rank's weights but the embedding, plus the KV cache attended; time: the step's "
                    "compute part (collectives excluded where they were timed or modelled); x ranks sharing the "
                    "device's memory; a fraction is None where the step beat the measured roof (served from "
                    "caches: the roof does not bound it)"}


def _below_roof(fraction: float) -> float | None:
    """A fraction of a measured roof, or None above it: a step faster than the device's copy (or matmul) roof was
    not bounded by it (weights small enough to stay in the CPU's caches, or a roof measured on a buffer too small
    to exceed them, as with --quick-roofline), so a fraction over 100% would be no figure at all."""
    return fraction if fraction <= 1 else None


def _baseline(record: dict, hf: Timing) -> dict:
    """HF's eager decode over the same shapes, and tplab's speed relative to it (> 1: tplab is faster)."""
    import transformers

    ttft, decode = spread([1e3 * s for s in hf.ttft_s]), spread([1e3 * s for s in hf.decode_step_s])
    against = "compute" if record["decode_compute_ms"] is not None else "total"
    name = hf_class_name(record["model"]["config"]["model_type"])
    return {"what": f"transformers {transformers.__version__} {name}, eager, SDPA attention, its own "
                    "DynamicCache, logits of the last position only, with rank 0's shapes and random weights, "
                    "no collectives",
            "ttft_ms": ttft, "decode_ms_per_token": decode, "tplab_part_compared": against,
            "decode_speed_vs_hf": decode["median"] / _compute_or_total(record, "decode"),
            "ttft_speed_vs_hf": ttft["median"] / _compute_or_total(record, "ttft")}
