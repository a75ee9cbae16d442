"""Benchmark TP inference: decode ms/token, TTFT and throughput over tp × batch × prompt length.

Two ways to time a rank, each recorded with its ``kind``:

* **measured**: real ranks and real collectives. On a CPU, threads or gloo
  processes (:func:`tplab.launch.launch`), for small models; on GPUs, NCCL
  under torchrun, one process per GPU, one tp per command (tp = processes)::

      torchrun --nproc-per-node 8 -m tplab bench --model llama-3-70b --tp 8 --batch 1,8,32,64 --prompt-len 128,2048

* **emulated** (``emulate=True``, ``--emulate-rank``): rank 0 alone on one
  device, with its real shapes and random weights (:mod:`tplab.emulation`);
  its compute is timed, its collectives are modelled by the α-β model over
  the link of ``gpu``/``interconnect``. ``layers`` builds only the first N
  layers and extrapolates to all (``scaled`` in the record)::

      python -m tplab bench --emulate-rank --model llama-3-70b --tp 2,4,8 --batch 1,8,32,64 --prompt-len 128,2048

Each point is: ``warmup`` untimed requests, then ``repeats`` requests of
``batch`` different prompts of ``prompt_len`` tokens and ``decode_steps``
greedy decode steps (:mod:`tplab.bench_timing`); then the same requests
through Hugging Face's eager LlamaForCausalLM with this rank's shapes (the
baseline). Decode runs eagerly on a CPU and as a CUDA graph on a GPU
(:mod:`tplab.bench_decode`). Results are appended to ``out`` as JSON lines
(:mod:`tplab.bench_results`).

API::

    records = run_bench(BenchSpec(model="llama-3-70b", tps=[8], batches=[1, 8], prompt_lens=[128],
                                  emulate=True, layers=1), out="data/measurements")
"""
from __future__ import annotations

import gc
import os
import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from tplab.bench_decode import DECODE_MODES
from tplab.bench_env import environment, hardware_slug
from tplab.bench_models import (BenchModel, build_hf_shard, build_shard, describe, rank_bytes, resolve_model,
                                with_layers)
from tplab.bench_point import PointInputs, point_record, run_points
from tplab.bench_results import RecordLog, run_file_name
from tplab.bench_roofline import measure_copy_bandwidth, measure_matmul_tflops
from tplab.bench_timing import check_counts, time_hf
from tplab.dist import Dist
from tplab.emulation import CommModel, emulated_dist
from tplab.launch import BACKENDS, launch, under_torchrun
from tplab.loading import DTYPES
from tplab.model_config import ModelConfig
from tplab.perf import check_link
from tplab.specs import load_efficiency, load_gpu

QUICK_COPY_BYTES, QUICK_MATMUL_SIZE = 1 << 22, 512
MEMORY_USE_LIMIT = 0.9  # refuse a sweep that needs more than this share of the free memory


@dataclass
class BenchSpec:
    """A sweep. ``device``/``decode_mode`` None: CUDA and "graph" when a GPU is visible, else CPU and "eager".

    ``quick_roofline``: measure the device's roofs on small buffers (4 MiB copy,
    512² matmul): fast for tests and demos, but a low roof; the record's
    roofline methods say which sizes were used.
    ``threads``: torch's intra-op threads in every rank process and in the
    baseline (None: torch's default). On a CPU shared with other work, 1
    thread per rank gives far steadier timings: an op split over several
    threads waits for the slowest, and a preempted thread stalls it.
    """

    model: str = "tiny"
    tps: list[int] = field(default_factory=lambda: [1])
    batches: list[int] = field(default_factory=lambda: [1])
    prompt_lens: list[int] = field(default_factory=lambda: [128])
    decode_steps: int = 16
    repeats: int = 5
    warmup: int = 1
    dtype: str = "bfloat16"
    emulate: bool = False
    layers: int | None = None
    backend: str = "threads"
    device: str | None = None
    decode_mode: str | None = None
    gpu: str = "h100-sxm"
    interconnect: str | None = None
    efficiency: str | None = None
    baseline: bool = True
    seed: int = 0
    quick_roofline: bool = False
    threads: int | None = None


@dataclass
class Plan:
    """A checked spec: the resolved model, device, dtype, decode mode, points and (emulation) comm model per tp."""

    spec: BenchSpec
    model: BenchModel
    device: torch.device
    dtype: torch.dtype
    mode: str
    points: list[tuple[int, int]]
    comm_models: dict[int, CommModel]
    backend: str


def _positive_ints(name: str, values: list[int]) -> None:
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {values!r}")


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def plan(spec: BenchSpec) -> Plan:
    """Every check that needs no weights: ValueError with what to do, before anything large is allocated."""
    model = resolve_model(spec.model)
    _positive_ints("tps", spec.tps)
    _positive_ints("batches", spec.batches)
    _positive_ints("prompt_lens", spec.prompt_lens)
    check_counts(spec.decode_steps, spec.repeats, spec.warmup)
    if spec.threads is not None and (isinstance(spec.threads, bool) or not isinstance(spec.threads, int)
                                     or spec.threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {spec.threads!r}")
    if spec.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {spec.dtype!r}; choose one of {sorted(DTYPES)}")
    config = with_layers(model.config, spec.layers)
    for tp in spec.tps:
        config.check_tp(tp)
    longest = max(spec.prompt_lens) + spec.decode_steps
    if longest > config.max_position_embeddings:
        raise ValueError(f"prompt_len + decode_steps = {longest} exceeds the model's max_position_embeddings="
                         f"{config.max_position_embeddings}")
    device = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA device is visible: run on a GPU machine, or pass --device cpu")
    torchrun = under_torchrun()
    if torchrun and spec.emulate:
        raise ValueError("--emulate-rank runs one process on one device: start it with python, not torchrun")
    if torchrun and spec.tps != [int(os.environ["WORLD_SIZE"])]:
        raise ValueError(f"under torchrun, tp is the number of processes: pass --tp {os.environ['WORLD_SIZE']}")
    if torchrun and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # this process's GPU
    if not spec.emulate and not torchrun:
        if device.type != "cpu":
            raise ValueError("real ranks on GPUs run under torchrun (NCCL): torchrun --nproc-per-node N -m tplab bench "
                             "--tp N ...; here, use --emulate-rank or --device cpu")
        if spec.backend not in BACKENDS:
            raise ValueError(f"unknown backend {spec.backend!r}; choose one of {BACKENDS}")
    mode = spec.decode_mode or ("graph" if device.type == "cuda" else "eager")
    if mode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {mode!r}; choose one of {DECODE_MODES}")
    if mode == "graph" and device.type != "cuda":
        raise ValueError("decode mode 'graph' (CUDA graphs) needs a GPU; use 'eager' or 'static' on the CPU")
    comm_models = {}
    if spec.emulate:
        hw, efficiency = load_gpu(spec.gpu), load_efficiency(spec.efficiency)
        for tp in spec.tps:
            link = hw.link(spec.interconnect, tp)
            check_link(link, hw, tp)
            comm_models[tp] = CommModel(link, efficiency)
    _check_memory(spec, config, device, DTYPES[spec.dtype])
    points = [(b, p) for b in spec.batches for p in spec.prompt_lens]
    backend = "emulated" if spec.emulate else ("torchrun" if torchrun else spec.backend)
    return Plan(spec, model, device, DTYPES[spec.dtype], mode, points, comm_models, backend)


def ranks_per_device(spec: BenchSpec, device: torch.device, tp: int) -> int:
    """How many ranks share this device's memory: all tp real ranks on a CPU, one otherwise (one GPU each, or
    the one emulated rank)."""
    return tp if device.type == "cpu" and not spec.emulate else 1


def _check_memory(spec: BenchSpec, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a sweep whose largest point needs more than MEMORY_USE_LIMIT of the free memory of ``device``."""
    free = _free_bytes(device)
    for tp in spec.tps:
        need = rank_bytes(config, tp, dtype, max(spec.batches), max(spec.prompt_lens) + spec.decode_steps)
        ranks_here = ranks_per_device(spec, device, tp)
        total = ranks_here * sum(need.values())
        if total > MEMORY_USE_LIMIT * free:
            who = f"{ranks_here} ranks" if ranks_here > 1 else "rank 0"
            raise ValueError(
                f"at tp={tp}, {who} of {spec.model} with {config.num_layers} layers needs "
                f"{ranks_here * need['weights'] / 1e9:.1f} GB of weights + {ranks_here * need['kv_cache'] / 1e9:.1f} GB "
                f"of KV cache (batch {max(spec.batches)} x {max(spec.prompt_lens) + spec.decode_steps} positions), "
                f"more than {MEMORY_USE_LIMIT:.0%} of the {free / 1e9:.1f} GB free on {device}: build fewer layers "
                f"(--layers N, extrapolated), use a larger tp, or a smaller batch")


def bench_rank_program(dist: Dist, model_name: str, layers: int | None, dtype: str, points: list[tuple[int, int]],
                       inputs: dict, on_point: Callable[[], None] | None = None) -> list[dict]:
    """One rank: build its shard, time every point (launch-able on threads, gloo and torchrun)."""
    if inputs["threads"] is not None:
        torch.set_num_threads(inputs["threads"])
    model = build_shard(resolve_model(model_name), dist, DTYPES[dtype], layers, inputs["seed"])
    if dist.device.type == "cuda" and inputs["mode"] == "graph":
        dist.time_collectives = False  # no synchronize inside a captured graph
    return run_points(model, points, PointInputs(**inputs), on_point if dist.rank == 0 else None)


def _baseline(plan: Plan, tp: int, bar) -> list:
    """HF's eager decode over rank 0's shapes at ``tp``, for every point (None each when disabled)."""
    spec = plan.spec
    if not spec.baseline:
        return [None] * len(plan.points)
    config = with_layers(plan.model.config, spec.layers)
    hf = build_hf_shard(config, tp, plan.dtype, plan.device, spec.seed)
    out = []
    for batch, prompt_len in plan.points:
        generator = torch.Generator().manual_seed(spec.seed)
        ids = torch.randint(0, hf.config.vocab_size, (batch, prompt_len), generator=generator).to(plan.device)
        out.append(time_hf(hf, ids, spec.decode_steps, spec.repeats, spec.warmup))
        bar.update()
    del hf
    _release(plan.device)
    return out


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_bench(spec: BenchSpec, out: str | Path | None = None, progress: bool | None = None) -> list[dict]:
    """Run the sweep; append each record to ``out`` (a .jsonl file, or a folder for a new run file); return them."""
    p = plan(spec)
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
    quick = dict(nbytes=QUICK_COPY_BYTES, size=QUICK_MATMUL_SIZE) if spec.quick_roofline else {}
    roofline = {"copy": measure_copy_bandwidth(p.device, quick.get("nbytes")),
                "matmul": measure_matmul_tflops(p.device, p.dtype, quick.get("size"))}
    kind = "emulated" if spec.emulate else "measured"
    rank0 = not under_torchrun() or int(os.environ["RANK"]) == 0
    log = None
    if out is not None and rank0:
        out = Path(out)
        log = RecordLog(out if out.suffix == ".jsonl" else out / run_file_name(env, kind, run_id, hardware_slug(env)))
    units = len(spec.tps) * len(p.points) * (2 if spec.baseline else 1)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=units, desc=f"bench {spec.model}", disable=not (show and rank0))
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
        results = bench_rank_program(dist, spec.model, spec.layers, spec.dtype, p.points, inputs, bar.update)
        _release(p.device)
        return results
    on_point = bar.update if p.backend == "threads" else None
    results = launch(bench_rank_program, tp, spec.backend, timeout=3600.0,
                     args=(spec.model, spec.layers, spec.dtype, p.points, inputs, on_point))
    if on_point is None:
        bar.update(len(p.points))
    return results[0]


def _setting(p: Plan, tp: int, batch: int, prompt_len: int) -> dict:
    spec = p.spec
    setting = {"tp": tp, "rank": 0, "backend": p.backend, "batch": batch, "prompt_len": prompt_len,
               "decode_steps": spec.decode_steps, "repeats": spec.repeats, "warmup": spec.warmup, "dtype": spec.dtype,
               "decode_mode": p.mode, "device": str(p.device), "seed": spec.seed,
               "ranks_sharing_memory": ranks_per_device(spec, p.device, tp)}
    if tp in p.comm_models:
        setting["link"] = {"gpu": spec.gpu, "interconnect": p.comm_models[tp].link.name,
                           "efficiency": spec.efficiency or "data/efficiency.json"}
    return setting
