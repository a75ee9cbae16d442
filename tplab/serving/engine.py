"""The serving engine: continuous batching on tp ranks, every rank running the plan rank 0's scheduler made.

Rank 0 runs the serving loop (:func:`tplab.serving.loop.run_load`) on a
wall clock: requests arrive at their times, the scheduler plans each step,
and the plan is **broadcast** to every rank as one int64 tensor (two
broadcasts per step, its length then its contents, under the tag
"schedule"). Every rank then runs the same step on its shard: a forward pass
over the planned rows through the paged KV cache (:meth:`~tplab.engine.runner.ModelRunner.paged`:
2·layers + 1 all-reduces), the vocab-parallel greedy argmax (one all-gather),
and, when a sampled request emits, the all-gathered logits of those rows (one
more all-gather) drawn from that request's own seeded generator. So the
ranks agree on every token without another message, and the plan is made once.

The plan's wire format is :mod:`tplab.serving.plan`'s.

Each request gets the tokens it would get alone (:func:`tplab.engine.generate`
with that one prompt): its rows see only its own keys, at its own positions.
"""
from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Callable

import torch

from tplab.comm.group import Dist
from tplab.engine.runner import ModelRunner
from tplab.model.decoder import TPCausalLM
from tplab.model.loading import checkpoint_config, from_pretrained
from tplab.model.sampling import SamplingParams, sample
from tplab.serving.loop import WallClock, run_load
from tplab.serving.metrics import SLO
from tplab.serving.plan import (
    decode_plan,
    encode_plan,
    pass_plan,
    receive_plan,
    receive_tokens,
    send_tokens,
    share_plan,
)
from tplab.serving.requests import Request
from tplab.serving.scheduler import SchedulerConfig, StepPlan, check_serving
from tplab.serving.static import serve_static
from tplab.specs.model import ModelConfig

WARMUP = Request(-1, tuple(range(2, 18)), 4)  # one short request served untimed before the run


class RankStep:
    """What every rank does with a plan: build the step's batch, run the forward pass, pick each emitting row's token."""

    def __init__(self, runner: ModelRunner, requests: list[Request]) -> None:
        self.runner, self.model = runner, runner.model
        self.requests = {r.id: r for r in [*requests, WARMUP]}
        self.generators: dict[int, torch.Generator] = {}

    def sampling(self, request_id: int) -> SamplingParams:
        r = self.requests[request_id]
        return SamplingParams(r.temperature, r.top_k, r.top_p, r.seed)

    def run(self, rows: list[tuple[int, int, bool, list[int], list[int]]]) -> dict[int, int] | None:
        """rows: (request id, start, emits, block table, tokens fed); {request id: next token} for the rows that emit
        (None on a pipeline stage before the last: its states went to the next stage)."""
        device = self.model.device
        ids = torch.tensor([[t for row in rows for t in row[4]]], device=device)  # (1, N): packed, no padding
        hidden = self.runner.paged(ids, [row[3] for row in rows], [row[1] for row in rows], [len(row[4]) for row in rows])
        if hidden is None:
            return None
        chosen = self.model.greedy(hidden).tolist()
        emitting = [b for b, row in enumerate(rows) if row[2]]
        sampled = [b for b in emitting if not self.sampling(rows[b][0]).greedy]
        if sampled:
            logits = self.model.logits(hidden[sampled])
            for i, b in enumerate(sampled):
                rid = rows[b][0]
                params = self.sampling(rid)
                if rid not in self.generators:  # made at the request's first token, on every rank alike
                    self.generators[rid] = params.generator()
                chosen[b] = int(sample(logits[i:i + 1], params, self.generators[rid])[0])
        return {rows[b][0]: chosen[b] for b in emitting}


class RankZeroSteps:
    """Rank 0's :class:`~tplab.serving.loop.StepQueue`: it shares each plan with its TP group, runs the first
    stage's share, and, with pipeline stages, keeps up to one plan in flight per stage; a plan's tokens come back
    from the last stage (the token return) in the order the plans went out."""

    def __init__(self, model: TPCausalLM, stage_step: Callable[[list[int]], dict[int, int] | None]) -> None:
        self.dist, self.pipe, self.stage_step = model.dist, model.pipe, stage_step
        self.depth = 1 if self.pipe is None else self.pipe.world_size
        self.in_flight: deque[tuple[StepPlan, dict[int, int] | None]] = deque()

    def submit(self, plan: StepPlan) -> None:
        self.in_flight.append((plan, self.stage_step(share_plan(self.dist, encode_plan(plan)))))

    def collect(self) -> dict[int, int]:
        plan, tokens = self.in_flight.popleft()
        if self.pipe is None:
            return tokens
        return receive_tokens(self.pipe, [r.seq.id for r in plan.rows if r.emits])


def serve(model: TPCausalLM, requests: list[Request], config: SchedulerConfig, eos: frozenset[int],
          slo: SLO = SLO(), warmup: bool = True, concurrency: int | None = None,
          compiled_attention: bool = False) -> dict:
    """Serve ``requests`` on every rank of ``model``'s grid; rank 0 returns the run (requests, summary, steps),
    the others their cache size; with stages, every rank also its ``stage_idle``, the share of the run it spent
    blocked in its pipeline group. Collectives are recorded under "serve" (the steps) and "schedule" (the plans);
    ``warmup`` first serves one short request untimed, under "warmup"; ``concurrency``: a closed loop of that many
    requests in flight (:func:`~tplab.serving.loop.run_load`); ``compiled_attention``: the decodes attend through
    the compiled paged-attention kernel (:meth:`~tplab.engine.ModelRunner.start_paged`), compiled before the run.

    With pipeline stages (``launch(..., pp=P)``) each stage runs its layers of every plan: the first stage gets
    the plan from rank 0's scheduler, hands it on with its activations, and the last stage's rank 0 returns the
    chosen tokens to rank 0, which keeps up to P plans in flight (:class:`RankZeroSteps`).
    """
    config.check_context(model.config.max_position_embeddings)
    dist, pipe = model.dist, model.pipe
    runner = ModelRunner(model)
    cache = runner.start_paged(config.num_blocks, config.block_size, compiled_attention)
    ranks = RankStep(runner, requests)
    experts = None if dist.grid is None or dist.grid.ep.world_size == 1 else dist.grid.ep
    groups = [g for g in (dist, pipe, experts) if g is not None]
    old_tags = [g.stats.tag for g in groups]

    def stage_step(ints: list[int]) -> dict[int, int] | None:
        if pipe is not None and not model.is_last_stage:
            pass_plan(pipe, ints)
        tokens = ranks.run(decode_plan(ints))
        if pipe is not None and model.is_last_stage and dist.rank == 0:
            send_tokens(pipe, tokens)
        return tokens

    run, serve_s = None, 0.0
    try:
        for phase, load in [*([("warmup", [WARMUP])] if warmup else []), ("serve", requests)]:
            for g in groups:
                g.stats.tag = phase
            started = time.perf_counter()
            if not model.is_first_stage:
                while ints := receive_plan(pipe):
                    stage_step(ints)
            elif dist.rank == 0:
                run = run_load(load, config, RankZeroSteps(model, stage_step), WallClock(), eos, slo,
                               concurrency if phase == "serve" else None)
                share_plan(dist, None)
            else:
                while ints := share_plan(dist, None):
                    stage_step(ints)
            if pipe is not None and not model.is_last_stage:
                pass_plan(pipe, [])
            serve_s = time.perf_counter() - started
    finally:
        for g, tag in zip(groups, old_tags):
            g.stats.tag = tag
    # the share of the run this stage spent blocked in its pipeline group: waiting for a plan, activations or tokens
    idle = None if pipe is None else sum(r.seconds for r in pipe.stats.records if r.started >= started) / serve_s
    out = {"cache_bytes_per_rank": cache.total_bytes, "stage_idle": idle}
    if run is None:
        return out
    return {**run.to_dict(), "steps": run.steps, "utilization": run.utilization, "scheduler_s": run.scheduler_s,
            **out}


def serve_rank_program(dist: Dist, model: str | Path | ModelConfig, requests: list[Request],
                       config: SchedulerConfig, dtype: torch.dtype | str | None = None, slo: SLO = SLO(),
                       eos_token_ids: tuple[int, ...] | None = None, warmup: bool = True,
                       concurrency: int | None = None, pp_layers: list[int] | None = None,
                       expert_dispatch: str = "all-reduce", prepack: bool = False,
                       compiled_attention: bool = False) -> dict:
    """Load this rank's shard and serve: ``launch(serve_rank_program, tp, backend, pp=P, ep=E, kwargs=...)``
    (threads, gloo, torchrun). ``config.policy`` "padded" serves static batches through the generation loop
    (:mod:`tplab.serving.static`), on one stage. ``pp_layers``: decoder layers per stage (default the even split);
    ``expert_dispatch``: how a mixture's tokens reach experts placed whole (:mod:`tplab.model.moe`); ``prepack``:
    the linears in oneDNN's blocked layout (CPU; :meth:`~tplab.model.TPCausalLM.prepack_`); ``compiled_attention``:
    the decodes' attention through the compiled paged-attention kernel (the paged engine only)."""
    pp = 1 if dist.grid is None else dist.grid.num_stages
    check_serving(config.policy, concurrency, pp, compiled_attention)
    model = checkpoint_config(model)  # read once: the context checked here, the weights loaded from it below
    config.check_context(model.max_position_embeddings)
    shard = from_pretrained(model, dist, dtype=dtype, pp_layers=pp_layers, expert_dispatch=expert_dispatch,
                            prepack=prepack)
    eos = frozenset(shard.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    if config.policy == "padded":
        if warmup:
            serve_static(shard, [WARMUP], 1, eos)
        run = serve_static(shard, requests, config.max_num_seqs, eos, slo)
        result = {"stage_idle": None} if run is None else {**run.to_dict(), "steps": [], "utilization": [],
                                                            "cache_bytes_per_rank": 0, "stage_idle": None,
                                                            "scheduler_s": None}
    else:
        result = serve(shard, requests, config, eos, slo, warmup, concurrency, compiled_attention)
    if dist.rank == 0:
        result.update(tp=dist.world_size, pp=pp, device=str(dist.device), threads=torch.get_num_threads(),
                      comm=dist.stats.summary("serve"), schedule_comm=dist.stats.summary("schedule"),
                      pipeline_comm=None if shard.pipe is None else shard.pipe.stats.summary("serve"),
                      expert_comm=None if dist.grid is None or dist.grid.ep.world_size == 1
                      else dist.grid.ep.stats.summary("serve"))
    return result
