"""A cost model of tensor-parallel LLM inference on real GPUs. Every number it gives is modelled, not measured.

For a model, a GPU, a TP degree tp, a precision, a batch B, a prompt of P
tokens and O output tokens, per GPU (one rank):

* memory = weights + KV cache (B·(P+O) tokens) + activations + runtime
  overhead; it fits when that is within (1 - headroom) of the GPU's memory.
* one forward pass over n = B·T new tokens (T = 1 for a decode step at context
  c = P + O/2, averaged over the output; T = P for the prefill) is a roofline
  per part plus the terms a roofline lacks, with no overlap between them:

      t = max(W/bw, F_lin/(F·e(n))) + max(KV/bw, F_att/F) + L·t_layer + t_step + B·L·t_seq
          + (2L+1)·(t_base + 2(tp-1)·α + 2(tp-1)/tp · S/β) + T_allgather

  W and KV are the weight and cache bytes the rank reads, bw the achieved
  memory bandwidth, F the achieved peak FLOP/s of a large GEMM in the
  precision (``compute``, ``compute_fp8``), e(n) = n/(n + n½) how much of it a
  GEMM over n tokens reaches, F_att the attention FLOPs (quadratic in P for a
  prefill). t_layer and t_step are fixed times per layer and per pass (norms,
  RoPE, activation, residual adds, sampling, launch or graph replay) for the
  engine profile (``graph``, ``served``, ``eager``), t_seq the work per
  sequence per layer. Each all-reduce of S bytes pays a base latency t_base,
  a per-hop latency α of the link, and the ring's bandwidth term over β.
* a mixture of experts (``ep``, ``dispatch``, :mod:`tplab.perf.experts`): W counts the expert weights the step's
  tokens touch, the experts' FLOPs run at e(N k / E) (each expert's GEMM sees its own tokens) on the busiest
  rank, and dispatched tokens pay 3 all-to-alls ((tp-1)α + S/β each, S what leaves the busiest rank) and an
  all-gather per layer in place of the MLP's all-reduce.
* TTFT is the prefill of all B prompts at once (plus, served, the request's own overhead).
* throughput = B·O / (TTFT + (O-1)·t) output tokens/s for the TP group;
  cost per million output tokens = price·tp / throughput.

The parameters come from data/efficiency.json (:class:`tplab.specs.efficiency.Efficiency`), most of them fitted
to published GPU measurements (``scripts/fit_cost_model.py``, :mod:`tplab.bench.fit`), each with its provenance.
fp8 on a GPU without FP8 tensor cores (A100) falls back explicitly to weight-only
FP8 (W8A16: 1-byte weights, BF16 math), as vLLM's FP8 Marlin kernels do; the
estimate says so in ``notes``. int8 means W8A8 (int8 math), int4 W4A16.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from tplab.checks import is_positive_int
from tplab.perf.comm import all_to_all_seconds, ring_all_gather_seconds, ring_all_reduce_seconds
from tplab.perf.experts import ExpertSplit
from tplab.perf.shapes import StepWork, activation_bytes, check_precision, step_work, weight_bytes
from tplab.specs.efficiency import Efficiency, load_efficiency
from tplab.specs.hardware import GpuSpec, Link, load_gpu
from tplab.specs.model import ModelConfig, resolve_model

GB = 1e9
MODELLED = "modelled (not measured)"
ENGINES = ("graph", "served", "eager")  # compiled / CUDA graphs; the same behind an HTTP server; one launch per op


@dataclass(frozen=True)
class Estimate:
    """One modelled configuration. ``breakdown`` holds the parts: memory_gb, decode_ms and ttft_ms, each a dict."""

    model: str
    gpu: str
    interconnect: str
    tp: int
    dtype: str
    kv_dtype: str
    compute_dtype: str
    batch: int
    prompt_len: int
    output_len: int
    memory_per_gpu_gb: float
    usable_memory_gb: float
    fits: bool
    decode_ms_per_token: float
    ttft_ms: float
    throughput_tok_s: float
    decode_tok_s: float
    bound: str
    cost_per_million_tokens: float | None
    breakdown: dict[str, dict[str, float]]
    notes: tuple[str, ...] = field(default=())
    engine: str = "graph"
    experts: ExpertSplit | None = None  # a mixture's placement; None for a dense model

    @property
    def throughput_per_gpu_tok_s(self) -> float:
        return self.throughput_tok_s / self.tp

    def summary(self) -> str:
        """A few lines describing this estimate, labelled as modelled."""
        cost = "" if self.cost_per_million_tokens is None else f", ${self.cost_per_million_tokens:.2f} per 1M output tokens"
        lines = [
            f"[{MODELLED}] {self.model} on {self.tp} x {self.gpu} over {self.interconnect}, {self.dtype} weights, "
            f"{self.kv_dtype} KV, batch {self.batch}, {self.prompt_len}+{self.output_len} tokens",
            f"  memory/GPU {self.memory_per_gpu_gb:.1f} GB of {self.usable_memory_gb:.1f} usable: "
            f"{'fits' if self.fits else 'DOES NOT FIT'}",
            f"  decode {self.decode_ms_per_token:.2f} ms/token ({self.bound}-bound), TTFT {self.ttft_ms:.0f} ms, "
            f"{self.throughput_tok_s:.0f} tok/s{cost}",
        ]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def compute_dtype_for(gpu: GpuSpec, dtype: str) -> tuple[str, tuple[str, ...]]:
    """The precision the tensor cores run for ``dtype`` weights, and a note where it falls back."""
    if dtype in ("fp8", "int8") and gpu.tflops(dtype) is not None:
        return dtype, ()
    if dtype == "fp8":
        return "bf16", (f"{gpu.name} has no FP8 tensor cores: fp8 is modelled as weight-only W8A16 "
                        "(1-byte weights, BF16 math), as vLLM's FP8 Marlin kernels run it",)
    return "bf16", ()


def collective_seconds(work: StepWork, link: Link, tp: int, eff: Efficiency) -> float:
    """(all-reduces)·(base + ring all-reduce) + (base + ring all-gather of the logits), plus a mixture's dispatch:
    per layer 3·base + the all-to-alls' (tp-1)α + S/β and an all-gather; 0 for tp=1."""
    if tp == 1:
        return 0.0
    alpha, beta, base = link.alpha_us * 1e-6, link.bandwidth_gb_s * GB * eff.link, eff.collective_base_us * 1e-6
    reduce = base + ring_all_reduce_seconds(work.all_reduce_bytes, tp, alpha, beta)
    gather = base + ring_all_gather_seconds(work.gather_bytes, tp, alpha, beta) if work.gather_bytes else 0.0
    dispatch = 0.0
    if work.all_to_alls:
        rounds = work.all_to_alls // work.layers
        dispatch = work.all_to_alls * base + work.layers * (
            rounds * all_to_all_seconds(work.all_to_all_bytes / rounds, tp, alpha, beta)
            + base + ring_all_gather_seconds(work.expert_gather_bytes, tp, alpha, beta))
    return work.all_reduces * reduce + gather + dispatch


def gemm_efficiency(eff: Efficiency, compute_dtype: str, tokens: int) -> float:
    """e(n) = e_max · n / (n + n½): the achieved fraction of peak of a GEMM over n tokens (e_max per precision)."""
    peak_fraction = eff.compute_fp8 if compute_dtype in ("fp8", "int8") else eff.compute
    return peak_fraction * tokens / (tokens + eff.gemm_half_tokens)


def engine_overheads_us(eff: Efficiency, engine: str) -> tuple[float, float]:
    """(t_layer, t_step) in µs of an engine profile: "graph", "served" or "eager"."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine profile {engine!r}; choose one of {ENGINES}")
    return {"graph": (eff.layer_overhead_us, eff.step_overhead_us),
            "served": (eff.layer_overhead_us, eff.served_step_overhead_us),
            "eager": (eff.eager_layer_overhead_us, eff.eager_step_overhead_us)}[engine]


def overhead_seconds(work: StepWork, eff: Efficiency, engine: str) -> dict[str, float]:
    """{"fixed": L·t_layer + t_step (per engine profile), "per_sequence": B·L·t_seq}, in seconds."""
    layer, step = engine_overheads_us(eff, engine)
    return {"fixed": (work.layers * layer + step) * 1e-6,
            "per_sequence": work.sequences * work.layers * eff.sequence_overhead_us * 1e-6}


def step_seconds(work: StepWork, gpu: GpuSpec, link: Link, tp: int, compute_dtype: str, eff: Efficiency,
                 engine: str = "graph") -> dict[str, float]:
    """The parts of one forward pass, in seconds, summing to its time (see the module docstring).

    ``compute`` is the time by which the FLOPs outlast the memory traffic (0 when memory-bound).
    """
    bw = gpu.memory_bandwidth_gb_s * GB * eff.memory_bandwidth
    linear_flops_s = gpu.tflops(compute_dtype) * 1e12 * gemm_efficiency(eff, compute_dtype, work.tokens)
    attention_flops_s = gpu.tflops("bf16") * 1e12 * eff.compute
    weights, kv = work.weight_bytes / bw, work.kv_bytes / bw
    gemms = work.linear_flops / linear_flops_s
    if work.expert_flops:
        gemms += work.expert_flops / (gpu.tflops(compute_dtype) * 1e12
                                      * gemm_efficiency(eff, compute_dtype, max(1.0, work.expert_tokens)))
    linear = max(weights, gemms)
    attention = max(kv, work.attention_flops / attention_flops_s)
    return {"weights": weights, "kv_cache": kv, "compute": linear - weights + attention - kv,
            **overhead_seconds(work, eff, engine), "communication": collective_seconds(work, link, tp, eff)}


def bound(work: StepWork, gpu: GpuSpec, compute_dtype: str, eff: Efficiency) -> str:
    """Which roof binds the pass: "compute" when its FLOPs take longer than its memory traffic, else "memory"."""
    parts = step_seconds(work, gpu, gpu.link(None, 1), 1, compute_dtype, eff)
    return "compute" if parts["compute"] > 0 else "memory"


def check_inputs(model: ModelConfig, tp: int, dtype: str, kv_dtype: str, batch: int, prompt_len: int,
                 output_len: int, experts: ExpertSplit | None = None) -> None:
    """Reject bad precisions, sizes, tp degrees (with a mixture's ``experts``) and contexts beyond the model's
    positions, before any work."""
    check_precision(dtype, kv_dtype)
    for name, value in (("batch", batch), ("prompt_len", prompt_len), ("output_len", output_len)):
        if not is_positive_int(value):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    model.check_tp(tp, 1 if experts is None else experts.ep)
    if experts is not None:
        experts.check(model, tp)
    limit = model.max_position_embeddings
    if limit is not None and prompt_len + output_len > limit:
        raise ValueError(f"prompt_len + output_len = {prompt_len + output_len} exceeds {model.name}'s "
                         f"max_position_embeddings={limit}")


def check_link(link: Link, gpu: GpuSpec, tp: int) -> None:
    """Reject a link that cannot join tp GPUs (an NVLink bridge joins pairs only)."""
    if link.max_gpus is not None and tp > link.max_gpus:
        others = [name for name, other in gpu.interconnects.items() if (other.max_gpus or tp) >= tp]
        hint = (f"use interconnect={others[0]!r}" if others else
                "span nodes with a network (e.g. interconnect='ib-ndr-400') or use pipeline stages (tplab.perf.pipeline)")
        raise ValueError(f"{link.name} on {gpu.name} joins at most {link.max_gpus} GPUs; tp={tp} cannot use it: {hint}")


def memory_gb(model: ModelConfig, tp: int, dtype: str, kv_dtype: str, batch: int, tokens_per_seq: int,
              eff: Efficiency, micro_batch: int | None = None, **slice_kw) -> dict[str, float]:
    """Per-GPU memory parts in GB: weights, kv_cache (``batch`` sequences), activations (one forward pass of
    ``micro_batch`` sequences, default the batch, capped at the prefill chunk), runtime_overhead.

    ``slice_kw`` (layers, embedding, lm_head) restricts it to a pipeline stage.
    """
    micro_batch = batch if micro_batch is None else micro_batch
    chunk = min(micro_batch * tokens_per_seq, eff.prefill_chunk_tokens)
    layers = slice_kw.get("layers")
    return {
        "weights": weight_bytes(model, tp, dtype, **slice_kw) / GB,
        "kv_cache": batch * tokens_per_seq * model.kv_bytes_per_token(tp, kv_dtype, layers) / GB,
        "activations": activation_bytes(model, tp, chunk, micro_batch) / GB,
        "runtime_overhead": eff.runtime_overhead_gb,
    }


def usable_memory_gb(gpu: GpuSpec, eff: Efficiency) -> float:
    """The GPU's memory less the headroom kept free (``memory_headroom_fraction``): what a deployment may fill."""
    return gpu.memory_gb * (1 - eff.memory_headroom_fraction)


def largest_fitting(fits, too_many: int) -> int:
    """The largest n >= 1 with ``fits(n)``, by bisection, given that ``fits`` holds up to a point and fails from
    there on and that ``fits(too_many)`` fails; 0 when even ``fits(1)`` does not hold."""
    if not fits(1):
        return 0
    lo, hi = 1, too_many  # fits(lo) and not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def estimate(*, model: str | Path | ModelConfig, gpu: str | GpuSpec, tp: int, dtype: str = "bf16", batch: int = 1,
             prompt_len: int = 1024, output_len: int = 256, interconnect: str | None = None, kv_dtype: str = "bf16",
             price_per_gpu_hour: float | None = None,
             efficiency: Mapping[str, float] | str | Path | Efficiency | None = None,
             engine: str = "graph", ep: int = 1, dispatch: str = "all-reduce",
             imbalance: float | None = None, routing: str = "uniform") -> Estimate:
    """Model one configuration (see the module docstring for the formulas).

    ``interconnect`` is one of the GPU's links ("nvlink", "pcie"; default the
    fastest) or an inter-node network ("ib-ndr-400") for a TP group spanning
    nodes. ``price_per_gpu_hour`` (USD, yours to give: no default) enables the
    cost. ``efficiency`` overrides data/efficiency.json. ``engine`` sets the fixed overheads: "graph" (CUDA
    graphs or a compiled engine, timed in its process; the default), "served" (the same engine behind an HTTP
    server, timed at the client: each step also carries the streaming of its tokens) or "eager" (one kernel
    launch per op). A mixture of experts: ``ep`` 1 splits every expert over the tp GPUs, ``ep`` = tp places them
    whole, their tokens reaching them by ``dispatch`` ("all-reduce" or "all-to-all"), the busiest GPU getting
    ``imbalance`` times the mean pairs (None: the expectation under ``routing``, "uniform" or "collapsed";
    :class:`~tplab.perf.experts.ExpertSplit`).
    """
    dtype, kv_dtype = check_precision(dtype, kv_dtype)
    spec, hw, eff = resolve_model(model, strict=False), load_gpu(gpu), load_efficiency(efficiency)
    link = hw.link(interconnect, tp)
    experts = ExpertSplit(ep, dispatch, imbalance, routing) if spec.num_experts else None
    if experts is None and ep != 1:
        spec.check_ep(tp, ep)  # a dense model: ep is refused with its reason
    check_inputs(spec, tp, dtype, kv_dtype, batch, prompt_len, output_len, experts)
    check_link(link, hw, tp)
    if price_per_gpu_hour is not None and price_per_gpu_hour < 0:
        raise ValueError(f"price_per_gpu_hour must be >= 0, got {price_per_gpu_hour}")
    compute_dtype, notes = compute_dtype_for(hw, dtype)

    memory = memory_gb(spec, tp, dtype, kv_dtype, batch, prompt_len + output_len, eff)
    usable = usable_memory_gb(hw, eff)
    context = prompt_len + output_len // 2
    decode_work = step_work(spec, tp, dtype, kv_dtype, batch, 1, context, experts=experts)
    decode = step_seconds(decode_work, hw, link, tp, compute_dtype, eff, engine)
    prefill = step_seconds(step_work(spec, tp, dtype, kv_dtype, batch, prompt_len, 0, experts=experts), hw, link, tp,
                           compute_dtype, eff, engine)
    if engine == "served":  # the request itself: HTTP, tokenization, the first streamed chunk
        prefill["request"] = eff.served_request_overhead_us * 1e-6
    step, ttft = sum(decode.values()), sum(prefill.values())
    throughput = batch * output_len / (ttft + (output_len - 1) * step)
    cost = None if price_per_gpu_hour is None else price_per_gpu_hour * tp / 3600 / throughput * 1e6
    return Estimate(
        model=spec.name, gpu=hw.name, interconnect=link.name, tp=tp, dtype=dtype, kv_dtype=kv_dtype,
        compute_dtype=compute_dtype, batch=batch, prompt_len=prompt_len, output_len=output_len,
        memory_per_gpu_gb=sum(memory.values()), usable_memory_gb=usable, fits=sum(memory.values()) <= usable,
        decode_ms_per_token=step * 1e3, ttft_ms=ttft * 1e3, throughput_tok_s=throughput,
        decode_tok_s=batch / step, bound=bound(decode_work, hw, compute_dtype, eff),
        cost_per_million_tokens=cost,
        breakdown={"memory_gb": memory, "decode_ms": {k: v * 1e3 for k, v in decode.items()},
                   "ttft_ms": {k: v * 1e3 for k, v in prefill.items()}},
        notes=notes, engine=engine, experts=experts,
    )


def max_batch(*, model: str | Path | ModelConfig, gpu: str | GpuSpec, tp: int, dtype: str = "bf16",
              prompt_len: int = 1024, output_len: int = 256, kv_dtype: str = "bf16",
              efficiency: Mapping[str, float] | str | Path | Efficiency | None = None) -> int:
    """The largest batch whose KV cache still fits (0 when even the weights do not)."""
    dtype, kv_dtype = check_precision(dtype, kv_dtype)
    spec, hw, eff = resolve_model(model, strict=False), load_gpu(gpu), load_efficiency(efficiency)
    check_inputs(spec, tp, dtype, kv_dtype, 1, prompt_len, output_len)
    usable = usable_memory_gb(hw, eff)

    def fits(b: int) -> bool:
        return sum(memory_gb(spec, tp, dtype, kv_dtype, b, prompt_len + output_len, eff).values()) <= usable

    # the KV cache alone of this many sequences exceeds the usable memory
    return largest_fitting(fits, int(usable * GB // spec.kv_bytes_per_token(tp, kv_dtype) // (prompt_len + output_len)) + 2)


def min_tp(*, model: str | Path | ModelConfig, gpu: str | GpuSpec, dtype: str = "bf16", batch: int = 1,
           prompt_len: int = 1024, output_len: int = 256, interconnect: str | None = None, kv_dtype: str = "bf16",
           efficiency: Mapping[str, float] | str | Path | Efficiency | None = None) -> int:
    """The smallest tp the model can use, within the link's reach, at which the batch fits."""
    dtype, kv_dtype = check_precision(dtype, kv_dtype)
    spec, hw = resolve_model(model, strict=False), load_gpu(gpu)
    reach = [hw.link(interconnect)] if interconnect else hw.interconnects.values()
    limit = None if any(link.max_gpus is None for link in reach) else max(link.max_gpus for link in reach)
    kw = dict(model=spec, gpu=hw, dtype=dtype, batch=batch, prompt_len=prompt_len, output_len=output_len,
              interconnect=interconnect, kv_dtype=kv_dtype, efficiency=efficiency)
    candidates = spec.valid_tp(limit)
    for tp in candidates:
        if estimate(tp=tp, **kw).fits:
            return tp
    largest = estimate(tp=candidates[-1], **kw)
    raise ValueError(f"{spec.name} ({dtype}, batch {batch}, {prompt_len}+{output_len} tokens) does not fit on up to "
                     f"{candidates[-1]} x {hw.name} over {largest.interconnect}: {largest.memory_per_gpu_gb:.1f} GB per GPU at "
                     f"tp={candidates[-1]} vs {largest.usable_memory_gb:.1f} GB usable; try fp8/int4 weights, an fp8 "
                     f"KV cache, a smaller batch, or pipeline stages across nodes")


def throughput_curve(batches: list[int], **kw) -> list[Estimate]:
    """estimate(batch=b, **kw) for each b: throughput against batch (check ``.fits`` for where memory runs out)."""
    return [estimate(batch=b, **kw) for b in batches]
