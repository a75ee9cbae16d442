"""TP within a node and pipeline parallelism (PP) across nodes, against one TP group spanning the nodes.

A pipeline of ``pp`` stages, each a TP group of ``tp`` GPUs inside one node,
gives stage s its layers of the even split (:func:`tplab.specs.sharding.stage_layers`; the first stage also
the embedding, the last the lm_head). A batch of B sequences is cut into m
micro-batches of b = ceil(B/m). For one decode step (a token for every sequence):

    t_s    = the slowest stage's forward pass for b sequences (roofline + its TP all-reduces)
    t_hop  = α_net + b·h·2 bytes / β_net   (activations to the next stage)
    t_ret  = α_net + b·8 bytes / β_net     (the token ids back to the first stage)
    round  = max(pp·t_s + (pp-1)·t_hop + t_ret, m·t_s)   a micro-batch crosses every stage and hop before its
                                                          next token; each stage serves m micro-batches per round
    bubble = 1 - m·t_s / round            the share of a round each stage sits idle

so per-token latency = round and throughput = B / round per pipeline. This is the schedule of a serving engine
that keeps m batches in flight across steps (vLLM's virtual engines, and ``serve-bench --pp``); a loop that drains
the pipeline at the end of every step, as tplab's ``generate`` does, idles (p - 1)/(m + p - 1) of each step
instead (:func:`drain_bubble`). Prefill fills the pipeline GPipe-style:
TTFT = (m + pp - 1)·t_s,prefill + (pp - 1)·t_hop,prefill + t_ret.
Each stage stores its layers' weights and the KV cache of all B sequences for
those layers. The alternative, TP over all tp·pp GPUs, runs its rings over the
network: a ring is as fast as its slowest link, and we charge every hop the
network's α (pessimistic for the hops that stay inside a node).
Every number is modelled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from tplab.perf.batch import DEFAULT_NETWORK, ModelledStepCost
from tplab.perf.estimate import GB, Estimate, check_inputs, estimate, largest_fitting, usable_memory_gb
from tplab.perf.shapes import check_precision
from tplab.specs.efficiency import Efficiency, load_efficiency
from tplab.specs.hardware import GpuSpec, load_gpu
from tplab.specs.model import ModelConfig, resolve_model


def drain_bubble(pp: int, micro_batches: int, stage_s: float = 1.0, hop_s: float = 0.0) -> float:
    """The idle share of each stage when every step fills and drains the pipeline, as tplab's generation loop does.

    m micro-batches of t seconds per stage go through p stages, each hop taking h: the step ends when the last
    micro-batch leaves the last stage, (m + p - 1) t + (p - 1) h after it began, and each stage computed m t of it:

        bubble = 1 - m t / ((m + p - 1) t + (p - 1) h)  =  (p - 1) / (m + p - 1)  when h = 0.
    """
    step = (micro_batches + pp - 1) * stage_s + (pp - 1) * hop_s
    return 1 - micro_batches * stage_s / step


def decode_round(pp: int, micro_batches: int, stage_s: float, hop_s: float, return_s: float) -> float:
    """Seconds between two tokens of a sequence when m micro-batches stay in flight across steps:

        round = max(p·t + (p - 1)·h + r, m·t)

    a micro-batch crosses p stages of t, p - 1 hops of h and the token return r before its next step can start,
    and each stage serves the m micro-batches one after another."""
    return max(pp * stage_s + (pp - 1) * hop_s + return_s, micro_batches * stage_s)


@dataclass(frozen=True)
class PipelineEstimate:
    """One pipeline configuration: pp stages of TP groups of tp GPUs, m micro-batches."""

    tp: int
    pp: int
    micro_batches: int
    batch: int
    stage_memory_gb: float  # the fullest stage, per GPU
    usable_memory_gb: float
    fits: bool
    decode_ms_per_token: float
    ttft_ms: float
    throughput_tok_s: float
    bubble_fraction: float
    stage_ms: float  # t_s for one decode micro-batch
    hop_ms: float  # t_hop for one decode micro-batch
    stage_link: str = "-"  # the link between stages ("-" with one stage)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp


def estimate_pipeline(*, model: str | Path | ModelConfig, gpu: str | GpuSpec, tp: int, pp: int, micro_batches: int,
                      network: str | None = DEFAULT_NETWORK, dtype: str = "bf16", batch: int = 1,
                      prompt_len: int = 1024, output_len: int = 256, kv_dtype: str = "bf16",
                      interconnect: str | None = None, engine: str = "graph",
                      efficiency: Mapping[str, float] | str | Path | Efficiency | None = None) -> PipelineEstimate:
    """Model ``pp`` pipeline stages of ``tp`` GPUs (inside a node, over ``interconnect``) joined by ``network``
    (None: the fastest link that joins tp·pp GPUs in one node, else the default network; see
    :func:`tplab.perf.batch.link_for`). Stage times are :class:`~tplab.perf.batch.ModelledStepCost`'s, the
    simulator's."""
    dtype, kv_dtype = check_precision(dtype, kv_dtype)
    spec, hw, eff = resolve_model(model, strict=False), load_gpu(gpu), load_efficiency(efficiency)
    check_inputs(spec, tp, dtype, kv_dtype, batch, prompt_len, output_len)
    if not 1 <= micro_batches <= batch:
        raise ValueError(f"micro_batches must be between 1 and batch={batch}, got {micro_batches}")
    cost = ModelledStepCost(spec, hw, tp, dtype, kv_dtype, interconnect, engine, eff, pp, network)
    b = math.ceil(batch / micro_batches)
    context = prompt_len + output_len // 2
    stage, hop, ret = cost([(context, 1)] * b), cost.activation_hop_seconds(b), cost.token_return_seconds(b)
    round_s = decode_round(pp, micro_batches, stage, hop, ret)
    prefill = cost([(0, prompt_len)] * b)
    ttft = (micro_batches + pp - 1) * prefill + (pp - 1) * cost.activation_hop_seconds(b * prompt_len) + ret
    throughput = batch * output_len / (ttft + (output_len - 1) * round_s)
    stage_gb = sum(cost.stage_memory_gb(batch, prompt_len + output_len, b).values())
    usable = usable_memory_gb(hw, eff)
    return PipelineEstimate(tp, pp, micro_batches, batch, stage_gb, usable, stage_gb <= usable, round_s * 1e3,
                            ttft * 1e3, throughput, 1 - micro_batches * stage / round_s, stage * 1e3, hop * 1e3,
                            "-" if cost.stage_link is None else cost.stage_link.name)


def compare_tp_pp(*, gpus_per_node: int, nodes: int, micro_batches: list[int], network: str = DEFAULT_NETWORK,
                  **kw) -> tuple[Estimate, list[PipelineEstimate]]:
    """TP over all gpus_per_node·nodes GPUs through ``network``, and TP=gpus_per_node × PP=nodes for each m."""
    tp_all = estimate(tp=gpus_per_node * nodes, interconnect=network, **kw)
    pipelines = [estimate_pipeline(tp=gpus_per_node, pp=nodes, micro_batches=m, network=network, **kw)
                 for m in micro_batches]
    return tp_all, pipelines


def max_batch_pipeline(*, model: str | Path | ModelConfig, gpu: str | GpuSpec, tp: int, pp: int,
                       network: str | None = DEFAULT_NETWORK, dtype: str = "bf16", prompt_len: int = 1024,
                       output_len: int = 256, kv_dtype: str = "bf16", interconnect: str | None = None,
                       engine: str = "graph",
                       efficiency: Mapping[str, float] | str | Path | Efficiency | None = None) -> int:
    """The largest batch whose fullest stage still fits, with min(pp, batch) micro-batches (0 when even the
    weights do not fit): :func:`estimate_pipeline`'s sizing rule, without pricing a step."""
    dtype, kv_dtype = check_precision(dtype, kv_dtype)
    spec, hw, eff = resolve_model(model, strict=False), load_gpu(gpu), load_efficiency(efficiency)
    check_inputs(spec, tp, dtype, kv_dtype, 1, prompt_len, output_len)
    cost = ModelledStepCost(spec, hw, tp, dtype, kv_dtype, interconnect, engine, eff, pp, network)
    usable, tokens = usable_memory_gb(hw, eff), prompt_len + output_len

    def fits(b: int) -> bool:
        return sum(cost.stage_memory_gb(b, tokens, math.ceil(b / min(pp, b))).values()) <= usable

    # the KV cache alone of the stage with the most layers, for this many sequences, exceeds the usable memory
    kv_per_token = max(spec.kv_bytes_per_token(tp, kv_dtype, stage.layers) for stage in cost.stages)
    return largest_fitting(fits, int(usable * GB // kv_per_token // tokens) + 2)
