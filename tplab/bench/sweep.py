"""Benchmark TP inference: decode ms/token, TTFT and throughput over tp × batch × prompt length.

Two ways to time a rank, each recorded with its ``kind``:

* **measured**: real ranks and real collectives. On a CPU, threads or gloo
  processes (:func:`tplab.comm.launch.launch`), for small models; on GPUs, NCCL
  under torchrun, one process per GPU, one tp per command (tp = processes)::

      torchrun --nproc-per-node 8 -m tplab bench --model llama-3-70b --tp 8 --batch 1,8,32,64 --prompt-len 128,2048

* **emulated** (``emulate=True``, ``--emulate-rank``): rank 0 alone on one
  device, with its real shapes and random weights (:mod:`tplab.bench.emulation`);
  its compute is timed, its collectives are modelled by the α-β model over
  the link of ``gpu``/``interconnect``. ``layers`` builds only the first N
  layers and extrapolates to all (``scaled`` in the record)::

      python -m tplab bench --emulate-rank --model llama-3-70b --tp 2,4,8 --batch 1,8,32,64 --prompt-len 128,2048

Each point is: ``warmup`` untimed requests, then ``repeats`` requests of
``batch`` different prompts of ``prompt_len`` tokens and ``decode_steps``
greedy decode steps (:mod:`tplab.bench.timing`); then the same requests
through Hugging Face's eager LlamaForCausalLM with this rank's shapes (the
baseline). Decode runs eagerly on a CPU and as a CUDA graph on a GPU
(the runner's decode modes, :mod:`tplab.engine.runner`). Results are appended to ``out`` as JSON lines
(:mod:`tplab.bench.records`).

API::

    records = run_bench(BenchSpec(model="llama-3-70b", tps=[8], batches=[1, 8], prompt_lens=[128],
                                  emulate=True, layers=1), out="data/measurements")
"""
from __future__ import annotations

import gc
import os
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from tplab.bench.emulation import emulated_dist
from tplab.bench.env import environment, hardware_slug
from tplab.bench.models import bench_model, build_hf_shard, build_shard, describe
from tplab.bench.plan import QUICK_COPY_BYTES, QUICK_MATMUL_SIZE, BenchSpec, Plan, plan, ranks_per_device
from tplab.bench.point import PointInputs, point_record, run_points
from tplab.bench.records import RecordLog, check_record_target, run_file_name
from tplab.bench.roofline import measure_copy_bandwidth, measure_matmul_tflops
from tplab.bench.timing import time_hf
from tplab.comm.group import Dist
from tplab.comm.launch import default_threads, launch, under_torchrun
from tplab.model.loading import torch_dtype
from tplab.model.routing import layer_counts

__all__ = ["BenchSpec", "plan", "run_bench", "bench_rank_program"]

def bench_rank_program(dist: Dist, model_name: str, layers: int | None, dtype: str, points: list[tuple[int, int]],
                       inputs: dict, on_point: Callable[[], None] | None = None, quant: str | None = None,
                       expert_dispatch: str = "all-reduce") -> list[dict]:
    """One rank: build its shard (quantized when ``quant``; a mixture's whole experts reached by
    ``expert_dispatch`` when launched with ``ep``), time every point (launch-able on threads, gloo and torchrun)."""
    if inputs["threads"] is not None:
        torch.set_num_threads(inputs["threads"])
    model = build_shard(bench_model(model_name), dist, torch_dtype(dtype), layers, inputs["seed"], expert_dispatch)
    if quant:
        model.quantize_(quant)
    return run_points(model, points, PointInputs(**inputs), on_point if dist.rank == 0 else None)


def _baseline(plan: Plan, tp: int, bar) -> list:
    """HF's eager decode over rank 0's shapes at ``tp``, for every point (None each when disabled)."""
    spec = plan.spec
    if not spec.baseline or spec.ep > 1:  # whole experts have no HF twin at one rank's shapes
        return [None] * len(plan.points)
    config = plan.model.config.with_layers(spec.layers)
    hf = build_hf_shard(config, tp, plan.dtype, plan.device, spec.seed)
    bar.set_postfix_str(f"tp={tp}: HF's baseline")
    # the threads one rank had: the baseline runs rank 0's shapes on rank 0's share of the CPU, so the ratio
    # compares code, not thread counts (the process's setting is restored after)
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads or default_threads(ranks_per_device(spec, plan.device, tp)))
    out = []
    try:
        for batch, prompt_len in plan.points:
            generator = torch.Generator().manual_seed(spec.seed)
            ids = torch.randint(0, hf.config.vocab_size, (batch, prompt_len), generator=generator).to(plan.device)
            out.append(time_hf(hf, ids, spec.decode_steps, spec.repeats, spec.warmup))
            bar.update()
    finally:
        torch.set_num_threads(threads)
    del hf
    _release(plan.device)
    return out


class ProgressLines:
    """Progress where no terminal shows a bar (a log, a pipe, CI): one line per finished unit, with the elapsed
    time, to stderr."""

    def __init__(self, total: int, label: str, show: bool) -> None:
        self.total, self.label, self.show, self.done = total, label, show, 0
        self.started, self.stage = time.monotonic(), ""

    def _line(self) -> None:
        if self.show:
            print(f"{self.label}: {self.done}/{self.total} done, {time.monotonic() - self.started:.0f} s"
                  f"{'; ' + self.stage if self.stage else ''}", file=sys.stderr, flush=True)

    def set_postfix_str(self, stage: str) -> None:
        self.stage = stage
        self._line()

    def update(self, n: int = 1) -> None:
        self.done += n
        self._line()

    def close(self) -> None:
        pass


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_bench(spec: BenchSpec, out: str | Path | None = None, progress: bool | None = None) -> list[dict]:
    """Run the sweep; append each record to ``out`` (a .jsonl file, or a folder for a new run file); return them."""
    p = plan(spec)
    if out is not None:
        out = check_record_target(out)
    threads = torch.get_num_threads()
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    try:
        return _run(p, out, progress)
    finally:
        torch.set_num_threads(threads)


def _run(p: Plan, out: str | Path | None, progress: bool | None) -> list[dict]:
    spec = p.spec
    if p.device.type == "cuda":
        torch.cuda.set_device(p.device)
    env = environment(p.device)
    run_id = uuid.uuid4().hex[:8]
    kind = "emulated" if spec.emulate else "measured"
    rank0 = not under_torchrun() or int(os.environ["RANK"]) == 0
    units = len(spec.tps) * len(p.points) * (2 if spec.baseline else 1)
    show = progress is not False and rank0  # a bar on a terminal, a line per step elsewhere (a log, a pipe, CI)
    bar = tqdm(total=units, desc=f"bench {spec.model}") if show and sys.stderr.isatty() \
        else ProgressLines(units, f"bench {spec.model}", show)
    bar.set_postfix_str("measuring the device's copy and matmul roofs")
    quick = dict(nbytes=QUICK_COPY_BYTES, size=QUICK_MATMUL_SIZE) if spec.quick_roofline else {}
    roofline = {"copy": measure_copy_bandwidth(p.device, quick.get("nbytes")),
                "matmul": measure_matmul_tflops(p.device, p.dtype, quick.get("size"))}
    log = None
    if out is not None and rank0:
        out = Path(out)
        log = RecordLog(out if out.suffix == ".jsonl" else out / run_file_name(env, kind, run_id, hardware_slug(env)))
    inputs = asdict(PointInputs(spec.decode_steps, spec.repeats, spec.warmup, p.mode, spec.seed, spec.threads))
    records = []
    for tp in spec.tps:
        bar.set_postfix_str(f"tp={tp}")
        raw = _rank0_points(p, tp, inputs, bar)
        baselines = _baseline(p, tp, bar) if rank0 else [None] * len(p.points)
        for (batch, prompt_len), rank_raw, base in zip(p.points, raw, baselines):
            record = point_record(
                kind=kind, run_id=run_id, env=env, model=describe(p.model, spec.layers),
                setting=_setting(p, tp, batch, prompt_len), raw=rank_raw, comm_model=p.comm_models.get(tp),
                baseline=base, roofline=roofline)
            records.append(record)
            if log is not None:
                log.append(record)
    bar.close()
    if log is not None:
        print(f"appended {len(records)} {kind} records to {log.path}", file=sys.stderr)
    return records


def _rank0_points(p: Plan, tp: int, inputs: dict, bar) -> list[dict]:
    """Rank 0's raw results for every point: emulated in this process, or from real ranks."""
    spec = p.spec
    if spec.emulate:
        dist = emulated_dist(tp, p.device)
        results = bench_rank_program(dist, spec.model, spec.layers, spec.dtype, p.points, inputs, bar.update, spec.quant)
        _release(p.device)
        return results
    on_point = bar.update if p.backend == "threads" else None
    results = launch(bench_rank_program, tp, spec.backend, timeout=3600.0, ep=spec.ep,
                     args=(spec.model, spec.layers, spec.dtype, p.points, inputs, on_point, spec.quant,
                           spec.expert_dispatch))
    if on_point is None:
        bar.update(len(p.points))
    if spec.ep > 1:  # whole experts: each rank counted its own experts' pairs, and the layer's are their sum
        for i, point in enumerate(results[0]):
            if point["expert_tokens"] is not None:
                point["expert_tokens"] = layer_counts([torch.tensor(r[i]["expert_tokens"]) for r in results],
                                                      spec.ep).tolist()
    return results[0]


def _setting(p: Plan, tp: int, batch: int, prompt_len: int) -> dict:
    spec = p.spec
    setting = {"tp": tp, "rank": 0, "backend": p.backend, "batch": batch, "prompt_len": prompt_len,
               "decode_steps": spec.decode_steps, "repeats": spec.repeats, "warmup": spec.warmup, "dtype": spec.dtype, "quant": spec.quant,
               "ep": spec.ep, "expert_dispatch": spec.expert_dispatch,
               "decode_mode": p.mode, "device": str(p.device), "seed": spec.seed,
               "ranks_sharing_memory": ranks_per_device(spec, p.device, tp)}
    if tp in p.comm_models:
        setting["link"] = {"gpu": spec.gpu, "interconnect": p.comm_models[tp].link.name,
                           "efficiency": spec.efficiency or "data/efficiency.json"}
    return setting
