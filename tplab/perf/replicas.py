"""Quantize before you shard? One TP group against data-parallel replicas of smaller or quantized groups.

With G GPUs, an option (tp, dtype) runs R = G // tp independent replicas of the
model, each a TP group of tp GPUs. N concurrent requests spread evenly, so each
busy replica decodes a batch of b = ceil(N/R) (fewer than R are busy when N < R):

    per-token latency = one replica's decode step at batch b
    throughput        = N · (one replica's throughput at batch b) / b
    cost              = price · R·tp / throughput   (idle GPUs are paid for too)

Quantizing halves (fp8) or quarters (int4) the weight bytes every decode step
streams, which is also what sharding over more GPUs does; replicas then avoid
the all-reduces and serve requests in parallel. Every number is modelled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tplab.checks import check_int
from tplab.perf.estimate import Estimate, estimate


@dataclass(frozen=True)
class ReplicaOption:
    """One way to use the GPUs: ``replicas`` copies of a TP group of ``tp`` GPUs with ``dtype`` weights."""

    tp: int
    dtype: str
    replicas: int
    batch_per_replica: int
    estimate: Estimate  # one replica at batch_per_replica
    throughput_tok_s: float  # all busy replicas together
    cost_per_million_tokens: float | None

    @property
    def label(self) -> str:
        return f"{self.replicas} x TP{self.tp} {self.dtype}"

    @property
    def fits(self) -> bool:
        return self.estimate.fits


def compare_replicas(*, gpus: int, options: list[tuple[int, str]], concurrency: int, price_per_gpu_hour: float | None = None,
                     **estimate_kw) -> list[ReplicaOption]:
    """Each (tp, dtype) option run as gpus // tp replicas serving ``concurrency`` requests in total.

    ``estimate_kw`` are the other arguments of :func:`tplab.perf.estimate`
    (model, gpu, prompt_len, output_len, interconnect, kv_dtype, efficiency).
    """
    if not options:
        raise ValueError("options must list at least one (tp, dtype) pair, e.g. [(8, 'bf16'), (4, 'fp8')]")
    check_int("concurrency", concurrency)
    result = []
    for tp, dtype in options:
        if tp > gpus:
            raise ValueError(f"option TP{tp} {dtype} needs {tp} GPUs but only gpus={gpus} are available")
        replicas = gpus // tp
        batch = math.ceil(concurrency / replicas)
        one = estimate(tp=tp, dtype=dtype, batch=batch, price_per_gpu_hour=price_per_gpu_hour, **estimate_kw)
        throughput = concurrency * one.throughput_tok_s / batch
        cost = None if price_per_gpu_hour is None else price_per_gpu_hour * replicas * tp / 3600 / throughput * 1e6
        result.append(ReplicaOption(tp, dtype, replicas, batch, one, throughput, cost))
    return result
