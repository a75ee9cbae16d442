"""The modelled time of one serving step: rows at their own contexts, decodes and prefill chunks together.

A continuous-batching step feeds row i ``n_i`` tokens after ``c_i`` cached ones
(a decode: n_i = 1; a prefill chunk: n_i > 1). Its work is that of each row
alone, except that the weights are read once for the whole step and the
all-reduces are one per layer for the step's tokens, not one per row:

    W = W_row,   KV = Σ KV_i,   F_lin = Σ F_lin,i,   F_att = Σ F_att,i,   S = Σ S_i

and :func:`tplab.perf.estimate.step_seconds` turns that into time with the
fitted efficiencies. With pipeline stages, each stage does this for its own
layers (the first also the embedding, the last the LM head), and a hop between
stages costs α + S/β over the link between them. Every figure is modelled, not measured.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from tplab.perf.estimate import GB, check_link, compute_dtype_for, memory_gb, step_seconds, usable_memory_gb
from tplab.perf.experts import ExpertSplit
from tplab.perf.shapes import ACT_BYTES, StepWork, activation_bytes, check_precision, step_work, weight_bytes
from tplab.serving.loop import ServeRun
from tplab.serving.metrics import SLO
from tplab.serving.requests import Request
from tplab.serving.scheduler import SchedulerConfig
from tplab.serving.simulator import simulate
from tplab.specs.efficiency import Efficiency, load_efficiency
from tplab.specs.hardware import GpuSpec, Link, load_gpu
from tplab.specs.model import ModelConfig, resolve_model
from tplab.specs.sharding import stage_layers

DEFAULT_NETWORK = "ib-ndr-400"  # between nodes, when no link is named
VLLM_BATCH_DEFAULTS = ("vLLM's OpenAI-server defaults (EngineArgs.get_batch_defaults, vllm/engine/arg_utils.py): "
                       "max_num_seqs 1024 and max_num_batched_tokens 8192 on a GPU of 70 GiB or more other than "
                       "A100, else 256 and 2048")


def batch_work(row_works: list[StepWork], whole: StepWork | None = None) -> StepWork:
    """One pass over all rows: their works summed, the weights (and the number of all-reduces) counted once.
    ``whole``: a mixture's pass over all the rows' tokens at once, whose expert part (the weights its tokens touch,
    the busiest rank's expert FLOPs, the dispatch) does not add up row by row."""
    first = row_works[0] if whole is None else whole
    total = lambda name: sum(getattr(w, name) for w in row_works)  # noqa: E731
    return replace(first, kv_bytes=total("kv_bytes"), linear_flops=total("linear_flops"),
                   attention_flops=total("attention_flops"), all_reduce_bytes=total("all_reduce_bytes"),
                   gather_bytes=total("gather_bytes"), tokens=total("tokens"), sequences=total("sequences"))


TOKEN_ID_BYTES = 8  # the token return: one int64 per row, from the last stage to the first


@dataclass(frozen=True)
class StageShape:
    """What a pipeline stage runs: ``layers`` decoder layers, the embedding (first stage), the LM head (last)."""

    layers: int
    embedding: bool
    lm_head: bool


def stage_shapes(model: ModelConfig, pp: int) -> list[StageShape]:
    """Each stage of the even split of :func:`tplab.specs.sharding.stage_layers` (pp = 1: the whole model)."""
    return [StageShape(len(r), s == 0, s == pp - 1) for s, r in enumerate(stage_layers(model.num_layers, pp))]


def link_for(gpu: GpuSpec, interconnect: str | None, gpus: int) -> Link:
    """The link that joins ``gpus`` GPUs: the one named, else the fastest of the GPU's links that joins them in
    one node, else :data:`DEFAULT_NETWORK` (they span nodes). Between pipeline stages, ``gpus`` = tp·pp."""
    if interconnect is not None:
        return gpu.link(interconnect)
    reach = [link for link in gpu.interconnects.values() if link.max_gpus is None or link.max_gpus >= gpus]
    return max(reach, key=lambda link: link.bandwidth_gb_s) if reach else gpu.link(DEFAULT_NETWORK)


class ModelledStepCost:
    """Seconds of a step of rows [(context, new tokens), ...] on ``tp`` GPUs (modelled, not measured).

    With ``pp`` pipeline stages (each ``tp`` GPUs) a call prices the slowest stage's share of the step, and
    :meth:`hop_seconds` a message between stages over ``stage_interconnect`` (:func:`link_for`): α + S/β.
    """

    def __init__(self, model: str | Path | ModelConfig, gpu: str | GpuSpec, tp: int, dtype: str = "bf16",
                 kv_dtype: str = "bf16", interconnect: str | None = None, engine: str = "graph",
                 efficiency: Efficiency | None = None, pp: int = 1, stage_interconnect: str | None = None,
                 experts: ExpertSplit | None = None) -> None:
        """``experts``: a mixture's placement (:class:`~tplab.perf.experts.ExpertSplit`; default every expert
        split over the tp GPUs)."""
        self.dtype, self.kv_dtype = check_precision(dtype, kv_dtype)
        self.model, self.gpu, self.tp, self.engine = resolve_model(model, strict=False), load_gpu(gpu), tp, engine
        self.experts = (experts or ExpertSplit()) if self.model.num_experts else None
        self.model.check_tp(tp, 1 if self.experts is None else self.experts.ep)
        if self.experts is not None:
            self.experts.check(self.model, tp)
        self.link = self.gpu.link(interconnect, tp)
        check_link(self.link, self.gpu, tp)
        self.pp, self.stages = pp, list(dict.fromkeys(stage_shapes(self.model, pp)))
        self.stage_link = link_for(self.gpu, stage_interconnect, tp * pp) if pp > 1 else None
        self.compute_dtype, self.notes = compute_dtype_for(self.gpu, self.dtype)
        self.efficiency = efficiency or load_efficiency(None)
        self._row = lru_cache(maxsize=65536)(self._row_work)

    def _row_work(self, context: int, new_tokens: int, stage: StageShape) -> StepWork:
        return step_work(self.model, self.tp, self.dtype, self.kv_dtype, 1, new_tokens, context, stage.layers,
                         stage.embedding, stage.lm_head, self.experts)

    def _pass(self, rows: list[tuple[int, int]], stage: StageShape) -> StepWork:
        whole = self._row(0, sum(n for _, n in rows), stage) if self.experts is not None else None
        return batch_work([self._row(c, n, stage) for c, n in rows], whole)

    def parts(self, rows: list[tuple[int, int]]) -> dict[str, float]:
        """The step's parts in seconds (weights, kv_cache, compute, fixed, per_sequence, communication), for the
        slowest stage."""
        return max((step_seconds(self._pass(rows, stage), self.gpu, self.link, self.tp, self.compute_dtype,
                                 self.efficiency, self.engine) for stage in self.stages),
                   key=lambda parts: sum(parts.values()))

    def __call__(self, rows: list[tuple[int, int]]) -> float:
        return sum(self.parts(rows).values())

    def hop_seconds(self, nbytes: float) -> float:
        """α + S/β for one message of ``nbytes`` between stages (0 with one stage)."""
        if self.stage_link is None:
            return 0.0
        link = self.stage_link
        return link.alpha_us * 1e-6 + nbytes / (link.bandwidth_gb_s * GB * self.efficiency.link)

    def activation_hop_seconds(self, tokens: int) -> float:
        """Sending ``tokens`` hidden states (ACT_BYTES each element) to the next stage."""
        return self.hop_seconds(ACT_BYTES * tokens * self.model.hidden_size)

    def token_return_seconds(self, rows: int) -> float:
        """The chosen token ids of ``rows`` rows, from the last stage back to the first."""
        return self.hop_seconds(TOKEN_ID_BYTES * rows)

    def stage_memory_gb(self, batch: int, tokens_per_seq: int, micro_batch: int | None = None) -> dict[str, float]:
        """The fullest stage's per-GPU memory parts (:func:`tplab.perf.estimate.memory_gb`)."""
        return max((memory_gb(self.model, self.tp, self.dtype, self.kv_dtype, batch, tokens_per_seq, self.efficiency,
                              micro_batch, layers=stage.layers, embedding=stage.embedding, lm_head=stage.lm_head)
                    for stage in self.stages), key=lambda parts: sum(parts.values()))

    def kv_blocks(self, block_size: int, max_num_seqs: int, max_batched_tokens: int) -> int:
        """KV blocks of ``block_size`` tokens one GPU holds: what is left of its usable memory after the weights,
        a full step's activations and the runtime, over one block's bytes on one rank (its stage's layers)."""
        eff = self.efficiency
        usable = usable_memory_gb(self.gpu, eff) * GB
        blocks = min(
            int((usable - self._taken_bytes(stage, max_num_seqs, max_batched_tokens))
                // (block_size * self.model.kv_bytes_per_token(self.tp, self.kv_dtype, stage.layers)))
            for stage in self.stages)
        if blocks < 1:
            raise ValueError(f"{self.model.name} in {self.dtype} at tp={self.tp}, pp={self.pp} leaves no memory for a "
                             f"KV cache on {self.gpu.name} ({usable / GB:.1f} GB usable); raise --tp or --pp")
        return blocks

    def _taken_bytes(self, stage: StageShape, max_num_seqs: int, max_batched_tokens: int) -> float:
        return (weight_bytes(self.model, self.tp, self.dtype, layers=stage.layers, embedding=stage.embedding,
                             lm_head=stage.lm_head)
                + activation_bytes(self.model, self.tp, max_batched_tokens, max_num_seqs)
                + self.efficiency.runtime_overhead_gb * GB)


def vllm_batch_defaults(gpu: GpuSpec) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) that vLLM's server would take on ``gpu`` (:data:`VLLM_BATCH_DEFAULTS`)."""
    large = gpu.memory_gb * 1e9 >= 70 * 2**30 and "a100" not in gpu.name.lower()
    return (1024, 8192) if large else (256, 2048)


def simulate_on(cost: ModelledStepCost, requests: list[Request], config: SchedulerConfig, slo: SLO = SLO(),
                concurrency: int | None = None) -> ServeRun:
    """The serving simulator (:func:`tplab.serving.simulator.simulate`) on the modelled GPUs of ``cost``: its
    stages, the hops between them and the token return."""
    return simulate(requests, config, cost, slo, concurrency, cost.pp, cost.activation_hop_seconds,
                    cost.token_return_seconds)
