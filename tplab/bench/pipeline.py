"""Pipeline stages measured on CPU ranks: per-token latency, throughput and each stage's bubble, best of repeats.

:func:`measure_grid` runs the generation loop on a tp x pp grid (threads or gloo processes) and keeps the repeat
with the lowest decode ms/token, the one least disturbed by other work on the machine. Its bubble is each stage's
share of the decode time spent blocked in the pipeline group (:attr:`tplab.engine.GenerationResult.bubble`),
set beside the fill-and-drain model of the loop, (p - 1)/(m + p - 1) (:func:`tplab.perf.pipeline.drain_bubble`).
:func:`stage_timeline_rank` gives the same wait as intervals: each stage's last decode steps as "wait" (blocked in
the pipeline group: a recv, a send, the token return) and "work" (everything between), on the host's one clock.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from tplab.bench.timing import fastest_generation
from tplab.comm.group import Dist
from tplab.engine.generate import generate_rank_program
from tplab.perf.pipeline import drain_bubble
from tplab.specs.model import ModelConfig


@dataclass(frozen=True)
class GridRun:
    """The best of several repeats of one (tp, pp, micro-batches) generation: its times and per-stage bubbles."""

    tp: int
    pp: int
    micro_batches: int
    batch: int
    ttft_ms: float
    decode_ms_per_token: float
    decode_tok_s: float  # rows x decode steps / decode time
    bubble: list[float] | None  # per stage (measured), None at pp = 1
    model_bubble: float  # (p - 1)/(m + p - 1)
    tokens: list[list[int]]

    @property
    def mean_bubble(self) -> float | None:
        return None if self.bubble is None else sum(self.bubble) / len(self.bubble)

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "tokens"}, "mean_bubble": self.mean_bubble}


def measure_grid(model, prompts: list[list[int]], new_tokens: int, tp: int = 1, pp: int = 1,
                 micro_batches: int | None = None, backend: str = "threads", repeats: int = 3,
                 threads: int | None = 1) -> GridRun:
    """Generate ``new_tokens`` for every prompt on a tp x pp grid ``repeats`` times (each after an untimed warm-up);
    the fastest repeat. ``model``: a checkpoint directory, "tiny", or its ModelConfig; no row stops early."""
    best = fastest_generation(repeats, tp, backend, threads, pp, model=model, prompts=prompts,
                              max_new_tokens=new_tokens, micro_batches=micro_batches)
    first = best[0]
    return GridRun(tp, pp, first.micro_batches, len(prompts), 1e3 * first.ttft_s, first.ms_per_token,
                   len(prompts) * first.decode_steps / first.decode_s,
                   None if pp == 1 else [r.bubble for r in best[::tp]], drain_bubble(pp, first.micro_batches),
                   first.tokens)


def stage_timeline_rank(dist: Dist, model: str | Path | ModelConfig, prompts: list[list[int]], new_tokens: int,
                        micro_batches: int | None = None, steps: int = 3) -> dict:
    """Generate on this rank's stage (after an untimed warm-up) and return {"stage", "segments"}: the last ``steps``
    decode steps as (step, "work" or "wait", start, end) in time.perf_counter() seconds. A step ends with the
    token return, the last wait of the step; ``launch(stage_timeline_rank, tp, pp=P, kwargs=...)``."""
    generate_rank_program(dist, model, prompts, new_tokens, eos_token_ids=(), micro_batches=micro_batches,
                          warmup=True)
    pipe = dist.grid.pp
    waits = [r for r in pipe.stats.records if r.tag == "decode"]
    ends = [i for i, r in enumerate(waits) if r.op == "broadcast"]  # the token return closes each step
    if len(ends) <= steps:
        raise ValueError(f"asked for {steps} decode steps, the run had {len(ends) - 1} after the first")
    segments = []
    for k, (before, last) in enumerate(zip(ends[-steps - 1:-1], ends[-steps:])):
        t = waits[before].started + waits[before].seconds
        for r in waits[before + 1:last + 1]:
            segments += [(k, "work", t, r.started), (k, "wait", r.started, r.started + r.seconds)]
            t = r.started + r.seconds
    return {"stage": pipe.rank, "segments": segments}
