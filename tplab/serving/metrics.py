"""Serving metrics, per request and over a run.

Per request (times from its arrival):

* TTFT, time to first token: first output - arrival;
* TPOT, time per output token: (last output - first output) / (outputs - 1), the decode pace it saw;
* latency: last output - arrival;
* queueing delay: first scheduled - arrival;
* the longest gap between two of its outputs (inter-token latency, ITL): a stall, e.g. behind a long prefill.

Over the run: p50, p90, p95 and p99 of each (or the percentiles the SLO names; linear interpolation between
order statistics) and of every gap between consecutive outputs (ITL), output tokens/s and requests/s over the
run's span (first arrival to last output), goodput (requests/s meeting the SLO's bounds on TTFT and TPOT; None
when it has none: every request would meet it), the mean concurrency (requests in flight on average, from being
sent to the last output: the sum of latencies over the span, Little's law), preemptions, the prefix-cache hit
rate (tokens found among tokens looked up) and KV-block utilization over time.
"""
from __future__ import annotations

from dataclasses import dataclass

from tplab.serving.requests import Request, Sequence

PERCENTILES = (50, 90, 95, 99)  # as vllm bench serve and genai-perf report them; deployment guides quote p95
METRICS = ("ttft_ms", "tpot_ms", "latency_ms", "queue_ms")


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between order statistics; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def percentiles_of(rows: list[dict], metric: str, qs: tuple[float, ...] = (50, 95)) -> dict[str, float | None]:
    """{"p50": ..., "p95": ...} of ``metric`` over the requests ``rows`` that have it."""
    return percentile_table([r[metric] for r in rows if r[metric] is not None], qs)


def percentile_table(values: list[float], qs: tuple[float, ...]) -> dict[str, float | None]:
    """{"p50": ..., "p99.9": ...}: each percentile of ``values``."""
    return {f"p{q:g}": percentile(values, q) for q in qs}


def request_metrics(seq: Sequence) -> dict:
    """{id, prompt_len, output_ids, ttft_ms, tpot_ms, latency_ms, queue_ms, finish_reason, preemptions,
    prefix_hit_tokens}; times None for a request that produced no token."""
    arrival, times = seq.request.arrival_s, seq.token_times_s
    ms = lambda seconds: None if seconds is None else 1000 * seconds  # noqa: E731
    return {
        "id": seq.id, "prompt_len": len(seq.request.prompt), "output_ids": seq.outputs,
        "ttft_ms": ms(times[0] - arrival) if times else None,
        "tpot_ms": ms((times[-1] - times[0]) / (len(times) - 1)) if len(times) > 1 else None,
        "latency_ms": ms(times[-1] - arrival) if times else None,
        "queue_ms": ms(None if seq.first_scheduled_s is None else seq.first_scheduled_s - arrival),
        "itl_max_ms": ms(max(b - a for a, b in zip(times, times[1:]))) if len(times) > 1 else None,
        "finish_reason": seq.finish_reason, "preemptions": seq.preemptions,
        "prefix_hit_tokens": seq.prefix_hit_tokens,
    }


@dataclass(frozen=True)
class SLO:
    """A request meets the SLO when its TTFT and its TPOT are within these (None: no bound); ``percentiles``: the
    ones the run's summary reports (an SLO is stated at a percentile, e.g. "p95 TTFT under 500 ms")."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    percentiles: tuple[float, ...] = PERCENTILES

    @property
    def bounded(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None

    def met(self, row: dict) -> bool:
        if row["ttft_ms"] is None:
            return False
        tpot_ok = self.tpot_ms is None or row["tpot_ms"] is None or row["tpot_ms"] <= self.tpot_ms
        return (self.ttft_ms is None or row["ttft_ms"] <= self.ttft_ms) and tpot_ok


def summarize(rows: list[dict], span_s: float, preemptions: int, prefix_hit_rate: float | None,
              utilization: list[tuple[float, float]], slo: SLO = SLO(), gaps_ms: list[float] = ()) -> dict:
    """The run's summary (see the module docstring); ``utilization`` is [(time s, used fraction)] per step,
    ``gaps_ms`` every gap between consecutive outputs of a request."""
    served = [r for r in rows if r["ttft_ms"] is not None]
    outputs = sum(len(r["output_ids"]) for r in served)
    met = sum(map(slo.met, served)) if slo.bounded else None
    summary = {
        "requests": len(rows), "completed": len(served), "rejected": len(rows) - len(served),
        "duration_s": span_s, "output_tokens": outputs,
        "throughput_tok_s": outputs / span_s if span_s > 0 else None,
        "throughput_req_s": len(served) / span_s if span_s > 0 else None,
        "goodput_req_s": met / span_s if met is not None and span_s > 0 else None,
        "slo_met_fraction": met / len(served) if met is not None and served else None,
        "concurrency_mean": sum(r["latency_ms"] for r in served) / 1000 / span_s if span_s > 0 else None,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "preemptions": preemptions, "prefix_hit_rate": prefix_hit_rate,
        "kv_utilization_mean": sum(u for _, u in utilization) / len(utilization) if utilization else None,
        "kv_utilization_max": max((u for _, u in utilization), default=None),
    }
    for metric in METRICS:
        summary[metric] = percentiles_of(served, metric, slo.percentiles)
    summary["itl_ms"] = percentile_table(list(gaps_ms), slo.percentiles)
    return summary


def run_metrics(requests: list[Request], sequences: dict[int, Sequence], preemptions: int,
                prefix_hit_rate: float | None, utilization: list[tuple[float, float]], slo: SLO,
                steps: int) -> tuple[list[dict], dict]:
    """(per request in input order, the summary) of a finished run; its span runs from the first arrival to the
    last output."""
    rows = [request_metrics(sequences[r.id]) for r in requests]
    first = min((r.arrival_s for r in requests), default=0.0)
    last = max((s.finished_s for s in sequences.values() if s.token_times_s), default=first)
    gaps = [1000 * (b - a) for s in sequences.values() for a, b in zip(s.token_times_s, s.token_times_s[1:])]
    summary = summarize(rows, last - first, preemptions, prefix_hit_rate, utilization, slo, gaps)
    return rows, {**summary, "steps": steps}
