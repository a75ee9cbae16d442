"""TP within a node and pipeline parallelism (PP) across nodes, against one TP group spanning the nodes.

A pipeline of ``pp`` stages, each a TP group of ``tp`` GPUs inside one node,
gives every stage ceil(L/pp) decoder layers (the first stage also the
embedding, the last the lm_head). A batch of B sequences is cut into m
micro-batches of b = ceil(B/m). For one decode step (a token for every sequence):

    t_s    = the slowest stage's forward pass for b sequences (roofline + its TP all-reduces)
    t_hop  = α_net + b·h·2 bytes / β_net   (activations to the next stage; the last hop returns the token)
    round  = max(pp·(t_s + t_hop), m·t_s)  a micro-batch needs pp stages and pp hops before its next token,
                                           and each stage serves m micro-batches per round
    bubble = 1 - m·t_s / round            the share of a round each stage sits idle

so per-token latency = round and throughput = B / round per pipeline. This is the schedule of a serving engine
that keeps m batches in flight across steps (vLLM's virtual engines); a loop that drains the pipeline at the end of
every step, as tplab's ``generate`` does, idles (p - 1)/(m + p - 1) of each step instead (:func:`drain_bubble`). Prefill
fills the pipeline GPipe-style: TTFT = (m + pp - 1)·t_s,prefill + pp·t_hop,prefill.
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

from tplab.perf.estimate import (
    GB,
    Estimate,
    check_inputs,
    check_link,
    compute_dtype_for,
    estimate,
    memory_gb,
    step_seconds,
)
from tplab.perf.shapes import ACT_BYTES, check_precision, step_work
from tplab.specs.efficiency import Efficiency, load_efficiency
from tplab.specs.hardware import GpuSpec, Link, load_gpu
from tplab.specs.model import ModelConfig, resolve_model


def drain_bubble(pp: int, micro_batches: int, stage_s: float = 1.0, hop_s: float = 0.0) -> float:
    """The idle share of each stage when every step fills and drains the pipeline, as tplab's generation loop does.

    m micro-batches of t seconds per stage go through p stages, each hop taking h: the step ends when the last
    micro-batch leaves the last stage, (m + p - 1) t + (p - 1) h after it began, and each stage computed m t of it:

        bubble = 1 - m t / ((m + p - 1) t + (p - 1) h)  =  (p - 1) / (m + p - 1)  when h = 0.
    """
    step = (micro_batches + pp - 1) * stage_s + (pp - 1) * hop_s
    return 1 - micro_batches * stage_s / step


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

    @property
    def gpus(self) -> int:
        return self.tp * self.pp


def _hop_seconds(network: Link, pp: int, tokens: int, hidden: int, eff: Efficiency) -> float:
    """α + S/β for sending ``tokens`` activations to the next stage; 0 without stages to cross."""
    if pp == 1:
        return 0.0
    return network.alpha_us * 1e-6 + ACT_BYTES * tokens * hidden / (network.bandwidth_gb_s * GB * eff.link)


def _stage_seconds(spec: ModelConfig, hw: GpuSpec, link: Link, tp: int, pp: int, dtype: str, kv_dtype: str, batch: int,
                   new_tokens: int, context: int, eff: Efficiency) -> float:
    """The slower of the first stage (layers + embedding) and the last (layers + lm_head)."""
    layers = math.ceil(spec.num_layers / pp)
    compute_dtype, _ = compute_dtype_for(hw, dtype)
    return max(sum(step_seconds(step_work(spec, tp, dtype, kv_dtype, batch, new_tokens, context, layers, first, last),
                                hw, link, tp, compute_dtype, eff).values()) for first, last in _end_stages(pp))


def _end_stages(pp: int) -> list[tuple[bool, bool]]:
    """(holds the embedding, holds the lm_head) for the first and the last stage."""
    return [(True, pp == 1), (pp == 1, True)]


def estimate_pipeline(*, model: str | Path | ModelConfig, gpu: str | GpuSpec, tp: int, pp: int, micro_batches: int,
                      network: str = "ib-ndr-400", dtype: str = "bf16", batch: int = 1, prompt_len: int = 1024,
                      output_len: int = 256, kv_dtype: str = "bf16", interconnect: str | None = None,
                      efficiency: Mapping[str, float] | str | Path | Efficiency | None = None) -> PipelineEstimate:
    """Model ``pp`` pipeline stages of ``tp`` GPUs (inside a node, over ``interconnect``) joined by ``network``."""
    dtype, kv_dtype = check_precision(dtype, kv_dtype)
    spec, hw, eff = resolve_model(model, strict=False), load_gpu(gpu), load_efficiency(efficiency)
    link, net = hw.link(interconnect, tp), hw.link(network)
    check_inputs(spec, tp, dtype, kv_dtype, batch, prompt_len, output_len)
    check_link(link, hw, tp)
    if not 1 <= pp <= spec.num_layers:
        raise ValueError(f"pp must be between 1 and num_hidden_layers={spec.num_layers}, got {pp}")
    if not 1 <= micro_batches <= batch:
        raise ValueError(f"micro_batches must be between 1 and batch={batch}, got {micro_batches}")
    b = math.ceil(batch / micro_batches)
    context = prompt_len + output_len // 2
    stage = _stage_seconds(spec, hw, link, tp, pp, dtype, kv_dtype, b, 1, context, eff)
    hop = _hop_seconds(net, pp, b, spec.hidden_size, eff)
    round_s = max(pp * (stage + hop), micro_batches * stage)
    prefill = _stage_seconds(spec, hw, link, tp, pp, dtype, kv_dtype, b, prompt_len, 0, eff)
    ttft = (micro_batches + pp - 1) * prefill + pp * _hop_seconds(net, pp, b * prompt_len, spec.hidden_size, eff)
    throughput = batch * output_len / (ttft + (output_len - 1) * round_s)

    stage_gb = _stage_memory_gb(spec, tp, pp, dtype, kv_dtype, batch, b, prompt_len + output_len, eff)
    usable = hw.memory_gb * (1 - eff.memory_headroom_fraction)
    return PipelineEstimate(tp, pp, micro_batches, batch, stage_gb, usable, stage_gb <= usable, round_s * 1e3,
                            ttft * 1e3, throughput, 1 - micro_batches * stage / round_s, stage * 1e3, hop * 1e3)


def _stage_memory_gb(spec: ModelConfig, tp: int, pp: int, dtype: str, kv_dtype: str, batch: int, micro_batch: int,
                     tokens_per_seq: int, eff: Efficiency) -> float:
    """Per-GPU memory of the fuller end stage: its weights, the KV cache of its layers for all sequences,
    one micro-batch's activations and the runtime overhead."""
    layers = math.ceil(spec.num_layers / pp)
    return max(sum(memory_gb(spec, tp, dtype, kv_dtype, batch, tokens_per_seq, eff, micro_batch,
                             layers=layers, embedding=first, lm_head=last).values()) for first, last in _end_stages(pp))


def compare_tp_pp(*, gpus_per_node: int, nodes: int, micro_batches: list[int], network: str = "ib-ndr-400",
                  **kw) -> tuple[Estimate, list[PipelineEstimate]]:
    """TP over all gpus_per_node·nodes GPUs through ``network``, and TP=gpus_per_node × PP=nodes for each m."""
    tp_all = estimate(tp=gpus_per_node * nodes, interconnect=network, **kw)
    pipelines = [estimate_pipeline(tp=gpus_per_node, pp=nodes, micro_batches=m, network=network, **kw)
                 for m in micro_batches]
    return tp_all, pipelines
