"""A sweep before it runs: what each point allocates on rank 0, and how long the sweep should take on a GPU.

``python -m tplab bench ... --dry-run`` prints this and allocates nothing: the
way to size a sweep to the GPU time you have (or a bill) before paying for it. It runs
anywhere, e.g. on a laptop preparing a GPU run.

* Memory: rank 0's weights and KV cache, exact arithmetic on shapes
  (:func:`tplab.bench.models.rank_bytes`; with ``pp`` stages, those of stage 0, and the fullest stage's total); whether the point fits is decided by
  the one sizing rule ``plan`` uses (:func:`tplab.perf.estimate`: weights, KV
  cache, one forward pass's activations and the runtime's overhead within the
  usable memory, the GPU's less its headroom), so ``plan`` and ``--dry-run``
  agree. For float32, which the cost model lacks, weights + KV cache are held
  against ``MEMORY_USE_LIMIT`` of the GPU's memory.
* Times are MODELLED by :func:`tplab.perf.estimate` for ``spec.gpu`` and the
  layers that will be built (with stages, :func:`tplab.perf.pipeline.estimate_pipeline`, min(pp, batch)
  micro-batches in flight). A point runs ``warmup + repeats`` requests, each
  one prefill (TTFT) and ``decode_steps`` decode steps, then the same again
  through the HF baseline, counted as taking tplab's time:

      seconds = copies · (warmup + repeats) · (TTFT + decode_steps · t_step),  copies = 2 with the baseline

  Building the weights, capturing CUDA graphs and the roofline's own runs are
  not counted, nor a CPU's speed: on a CPU the figures say what a GPU would take.
"""
from __future__ import annotations

from dataclasses import dataclass

from tplab.bench.models import rank_bytes
from tplab.bench.plan import MEMORY_USE_LIMIT, BenchSpec, check_sweep
from tplab.bench.records import modelled_precision
from tplab.model.loading import torch_dtype
from tplab.perf.estimate import MODELLED, estimate
from tplab.perf.pipeline import estimate_pipeline
from tplab.specs.hardware import load_gpu


@dataclass(frozen=True)
class PointPreview:
    """One point of the sweep: rank 0's memory (exact) and its modelled times on the GPU of the spec."""

    tp: int
    batch: int
    prompt_len: int
    weights_gb: float
    kv_cache_gb: float
    total_gb: float  # what the sizing rule counts: + activations and runtime overhead (float32: weights + KV only)
    usable_gb: float
    fits: bool
    ttft_ms: float | None  # modelled; None for a dtype the cost model lacks (float32)
    decode_ms_per_token: float | None
    seconds: float | None  # the point's modelled duration, baseline included


@dataclass(frozen=True)
class SweepPreview:
    """The points of a sweep, and what they were modelled on."""

    gpu_label: str
    gpu_memory_gb: float
    layers_built: int
    layers_full: int
    points: list[PointPreview]

    @property
    def seconds(self) -> float | None:
        """The modelled duration of every point's timed requests (None without modelled times)."""
        return None if any(p.seconds is None for p in self.points) else sum(p.seconds for p in self.points)


def preview(spec: BenchSpec) -> SweepPreview:
    """Every point of ``spec`` (tp outermost, then batch, then prompt length), allocating nothing."""
    model, config = check_sweep(spec)
    gpu = load_gpu(spec.gpu)
    dtype = modelled_precision(spec.dtype)
    requests, copies = spec.warmup + spec.repeats, 2 if spec.baseline else 1
    out = []
    for tp in spec.tps:
        for batch in spec.batches:
            for prompt_len in spec.prompt_lens:
                need = rank_bytes(config, tp, torch_dtype(spec.dtype), batch, prompt_len + spec.decode_steps, spec.pp)
                ttft = step = seconds = None
                total, usable = sum(need.values()) / 1e9, MEMORY_USE_LIMIT * gpu.memory_gb
                if dtype is not None:
                    kw = dict(model=config, gpu=gpu, tp=tp, dtype=dtype, kv_dtype=dtype, batch=batch,
                              prompt_len=prompt_len, output_len=spec.decode_steps, interconnect=spec.interconnect,
                              efficiency=spec.efficiency)
                    if spec.pp == 1:
                        e = estimate(**kw)
                        ttft, step, total, usable = (e.ttft_ms, e.decode_ms_per_token, e.memory_per_gpu_gb,
                                                     e.usable_memory_gb)
                    else:
                        e = estimate_pipeline(pp=spec.pp, micro_batches=min(spec.pp, batch), network=None, **kw)
                        ttft, step, total, usable = e.ttft_ms, e.decode_ms_per_token, e.stage_memory_gb, e.usable_memory_gb
                    seconds = copies * requests * (ttft + spec.decode_steps * step) / 1e3
                out.append(PointPreview(tp, batch, prompt_len, need["weights"] / 1e9, need["kv_cache"] / 1e9, total,
                                        usable, total <= usable, ttft, step, seconds))
    return SweepPreview(gpu.label, gpu.memory_gb, config.num_layers, model.config.num_layers, out)


def print_preview(spec: BenchSpec, sweep: SweepPreview) -> None:
    """The table of :func:`preview`, its total, and what the figures are."""
    print(f"DRY RUN: nothing allocated, nothing measured. Memory: rank 0's weights + KV cache, exact; times: "
          f"{MODELLED} on one {sweep.gpu_label} per rank, {sweep.layers_built} of {sweep.layers_full} layers "
          f"built, {spec.warmup}+{spec.repeats} requests per point{' and the HF baseline' if spec.baseline else ''}"
          + ("" if spec.pp == 1 else f"; {spec.pp} pipeline stages of tp GPUs, memory of stage 0 (rank 0) and the "
                                     "fullest stage's total, min(pp, batch) micro-batches in flight"))
    print(f"{'tp':>3} {'batch':>5} {'prompt':>6} {'weights GB':>10} {'KV GB':>7} {'total/usable GB':>16} {'fits':>5} "
          f"{'TTFT ms':>9} {'decode ms/tok':>13} {'point s':>8}")
    for p in sweep.points:
        times = ("-", "-", "-") if p.seconds is None else (
            f"{p.ttft_ms:.1f}", f"{p.decode_ms_per_token:.2f}", f"{p.seconds:.1f}")
        print(f"{p.tp:>3} {p.batch:>5} {p.prompt_len:>6} {p.weights_gb:>10.2f} {p.kv_cache_gb:>7.2f} "
              f"{f'{p.total_gb:.1f}/{p.usable_gb:.1f}':>16} {'yes' if p.fits else 'NO':>5} {times[0]:>9} {times[1]:>13} "
              f"{times[2]:>8}")
    if sweep.seconds is not None:
        print(f"modelled total: {sweep.seconds:.0f} s ({sweep.seconds / 60:.1f} min) of timed requests, plus "
              "building the weights, graph capture and the roofline")
    else:
        print(f"no modelled times: the cost model has no {spec.dtype} (use bfloat16 or float16)")
    print("total: weights + KV cache + one forward pass's activations + runtime overhead, as `plan` counts them; "
          "usable: the GPU's memory less its headroom")
    if not all(p.fits for p in sweep.points):
        print(f"NO: a point needs more than the usable memory of a {sweep.gpu_label} ({sweep.gpu_memory_gb:.0f} GB); "
              "build fewer layers (--layers N), use a larger tp or a smaller batch")
