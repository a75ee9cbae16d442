"""A rank program for the serving tests: serve a load, then generate every request alone on the same shard."""
from __future__ import annotations

from pathlib import Path

from tplab.comm.group import Dist
from tplab.engine.generate import generate
from tplab.model.loading import from_pretrained
from tplab.model.sampling import SamplingParams
from tplab.serving.engine import serve
from tplab.serving.requests import Request
from tplab.serving.scheduler import SchedulerConfig


def serve_then_alone(dist: Dist, model: str | Path, requests: list[Request], config: SchedulerConfig,
                     eos: tuple[int, ...], expert_dispatch: str = "all-reduce", compiled_attention: bool = False) -> dict:
    """{"run": the served run (rank 0) or None, "alone": each request's tokens from ``generate`` with that prompt
    alone, "serve"/"schedule": this rank's collectives under those tags (and "pipe_serve"/"pipe_schedule", its
    pipeline group's, with stages), "stage", "cache_bytes"}. ``compiled_attention``: the engine's decodes through the
    compiled paged-attention kernel (``generate`` alone stays eager)."""
    shard = from_pretrained(model, dist, expert_dispatch=expert_dispatch)
    run = serve(shard, requests, config, frozenset(eos), compiled_attention=compiled_attention)
    serve_comm, schedule_comm = dist.stats.summary("serve"), dist.stats.summary("schedule")
    pipe = {} if shard.pipe is None else {"pipe_serve": shard.pipe.stats.summary("serve"),
                                          "pipe_schedule": shard.pipe.stats.summary("schedule")}
    alone = [generate(shard, [list(r.prompt)], r.max_new_tokens, SamplingParams(r.temperature, r.top_k, r.top_p, r.seed),
                      eos, [list(s) for s in r.stop]).tokens[0] for r in requests]
    first = shard.is_first_stage and dist.rank == 0
    return {"run": run if first else None, "alone": alone, "serve": serve_comm, "schedule": schedule_comm, **pipe,
            "stage": 0 if shard.pipe is None else shard.pipe.rank, "cache_bytes": run["cache_bytes_per_rank"]}
