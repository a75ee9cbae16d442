"""A benchmark sweep, checked: :class:`BenchSpec` (what to measure) and :func:`plan` (every check that needs no weights).

:func:`plan` resolves the model, the device and the decode mode, checks every
tp against the model's shapes and (for an emulated rank) the link's reach,
and refuses a sweep whose largest point would not fit in the device's free
memory, computed from shapes (:func:`tplab.bench.models.rank_bytes`), before
a single weight is allocated. Each refusal is a ValueError saying what to do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tplab.bench.emulation import CommModel
from tplab.bench.models import BenchModel, bench_model, rank_bytes
from tplab.bench.timing import check_counts
from tplab.checks import is_positive_int
from tplab.comm.launch import BACKENDS, under_torchrun
from tplab.engine.runner import COMPILED_MODES, DECODE_MODES, weight_copies
from tplab.layers.weights import check_scheme
from tplab.model.loading import torch_dtype
from tplab.perf.estimate import check_link
from tplab.specs.dtypes import torch_name
from tplab.specs.efficiency import load_efficiency
from tplab.specs.hardware import load_gpu
from tplab.specs.model import ModelConfig
from tplab.specs.sharding import check_dispatch, stage_layers

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
    quant: str | None = None  # weight-only "int8" or "fp8" for the decoder's linears
    pp: int = 1  # pipeline stages: sized and modelled by a dry run (tplab.bench.preview); a sweep measures pp = 1
    ep: int = 1  # a mixture's experts whole on the ep = tp ranks (no HF twin: the baseline is off)
    expert_dispatch: str = "all-reduce"  # how tokens reach whole experts (tplab.model.moe)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", torch_name(self.dtype))  # either spelling; records keep torch's name
        if self.quant is not None:
            check_scheme(self.quant)


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
    if not values or not all(map(is_positive_int, values)):
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {values!r}")


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_sweep(spec: BenchSpec) -> tuple[BenchModel, ModelConfig]:
    """The checks that need neither weights nor a device: the model and the config with the layers to build."""
    model = bench_model(spec.model)
    _positive_ints("tps", spec.tps)
    _positive_ints("batches", spec.batches)
    _positive_ints("prompt_lens", spec.prompt_lens)
    check_counts(spec.decode_steps, spec.repeats, spec.warmup)
    if spec.threads is not None and not is_positive_int(spec.threads):
        raise ValueError(f"threads must be a positive integer or None, got {spec.threads!r}")
    config = model.config.with_layers(spec.layers)
    for tp in spec.tps:
        config.check_tp(tp, spec.ep)
        check_dispatch(spec.expert_dispatch, tp, spec.ep)
    if spec.ep > 1 and spec.emulate:
        raise ValueError("an emulated rank has no expert group: measure whole experts on real ranks (no "
                         "--emulate-rank with --ep)")
    stage_layers(config.num_layers, spec.pp)
    longest = max(spec.prompt_lens) + spec.decode_steps + 1  # the prefill's token, then one per decode step
    if longest > config.max_position_embeddings:
        raise ValueError(f"prompt_len + decode_steps + 1 = {longest} tokens exceeds the model's "
                         f"max_position_embeddings={config.max_position_embeddings}")
    return model, config


def default_device(device: str | None) -> torch.device:
    """The device a sweep runs on: the one asked for, else a GPU where one is visible, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def plan(spec: BenchSpec) -> Plan:
    """Every check that needs no weights: ValueError with what to do, before anything large is allocated."""
    model, config = check_sweep(spec)
    if spec.pp > 1:
        raise ValueError(f"pp={spec.pp}: bench measures whole-model ranks; with --pp it sizes and models a sweep "
                         "(--dry-run). Measure pipeline stages with scripts/bench_pipeline.py or serve-bench --pp")
    device = default_device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA device is visible: run on a GPU machine, or pass --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # torch.cuda.set_device refuses a bare "cuda"
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
        raise ValueError("decode mode 'graph' (CUDA graphs) needs a GPU; use 'eager', 'static', 'compiled' or "
                         "'autotuned' on the CPU")
    if mode in ("graph", *COMPILED_MODES) and config.num_experts:
        raise ValueError(f"decode mode {mode!r} needs the same shapes at every step, and a mixture's router changes "
                         "them: use --decode static or eager")
    comm_models = {}
    if spec.emulate:
        hw, efficiency = load_gpu(spec.gpu), load_efficiency(spec.efficiency)
        for tp in spec.tps:
            link = hw.link(spec.interconnect, tp)
            check_link(link, hw, tp)
            comm_models[tp] = CommModel(link, efficiency)
    _check_memory(spec, config, device, torch_dtype(spec.dtype), mode)
    points = [(b, p) for b in spec.batches for p in spec.prompt_lens]
    backend = "emulated" if spec.emulate else ("torchrun" if torchrun else spec.backend)
    return Plan(spec, model, device, torch_dtype(spec.dtype), mode, points, comm_models, backend)


def ranks_per_device(spec: BenchSpec, device: torch.device, tp: int) -> int:
    """How many ranks share this device's memory: all tp real ranks on a CPU, one otherwise (one GPU each, or
    the one emulated rank)."""
    return tp if device.type == "cpu" and not spec.emulate else 1


def _check_memory(spec: BenchSpec, config: ModelConfig, device: torch.device, dtype: torch.dtype, mode: str) -> None:
    """Refuse a sweep whose largest point needs more than MEMORY_USE_LIMIT of the free memory of ``device``. On
    the CPU a compiled step holds a frozen copy of the weights, one runner per point (:func:`weight_copies`)."""
    free = _free_bytes(device)
    copies = weight_copies(mode in COMPILED_MODES and device.type == "cpu", len(spec.batches) * len(spec.prompt_lens))
    for tp in spec.tps:
        need = rank_bytes(config, tp, dtype, max(spec.batches), max(spec.prompt_lens) + spec.decode_steps)
        ranks_here = ranks_per_device(spec, device, tp)
        weights = ranks_here * copies * need["weights"]
        if weights + ranks_here * need["kv_cache"] > MEMORY_USE_LIMIT * free:
            who = f"{ranks_here} ranks" if ranks_here > 1 else "rank 0"
            frozen = f" ({copies} copies: the module's and compiled steps' frozen ones)" if copies > 1 else ""
            raise ValueError(
                f"at tp={tp}, {who} of {spec.model} with {config.num_layers} layers needs "
                f"{weights / 1e9:.1f} GB of weights{frozen} + {ranks_here * need['kv_cache'] / 1e9:.1f} GB "
                f"of KV cache (batch {max(spec.batches)} x {max(spec.prompt_lens) + spec.decode_steps} positions), "
                f"more than {MEMORY_USE_LIMIT:.0%} of the {free / 1e9:.1f} GB free on {device}: build fewer layers "
                f"(--layers N, extrapolated), use a larger tp, or a smaller batch")
