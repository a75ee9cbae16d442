"""The simulator: the engine's scheduler and metrics on a virtual clock, each step priced instead of run.

:func:`simulate` runs :func:`tplab.serving.loop.run_load`, the loop the
engine runs, with a :class:`~tplab.serving.loop.VirtualClock` that a step
advances by ``step_cost(rows)``, rows being [(context, new tokens), ...]. The
cost is modelled for GPUs (:class:`tplab.perf.batch.ModelledStepCost`) or
fitted to an engine's measured steps (:func:`tplab.serving.step_cost.fit_step_cost`).
With pipeline stages, up to pp steps are in flight at once
(:class:`VirtualPipeline`), as the engine's ``--pp`` runs them. No model runs, so no token is known: every request runs to its
``max_new_tokens`` (no EOS), and a simulated run's outputs are placeholders.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from tplab.serving.loop import ServeRun, VirtualClock, run_load
from tplab.serving.metrics import SLO
from tplab.serving.requests import Request
from tplab.serving.scheduler import SchedulerConfig, StepPlan

PLACEHOLDER_TOKEN = -1


class VirtualPipeline:
    """``stages`` pipeline stages on a virtual clock, up to one step in flight per stage (a StepQueue of depth pp).

    A step of rows R submitted at time t enters stage s when it arrives there and the stage has finished the step
    before it, runs ``stage_cost(R)`` seconds, and hops to the next stage in ``hop_seconds(tokens)``; after the
    last stage its tokens return to the first in ``return_seconds(rows)``. The clock moves to when the first stage
    is free again: that is when the scheduler can start the next step. With one stage this is one step at a time,
    each taking ``stage_cost(R)``.
    """

    def __init__(self, clock: VirtualClock, stage_cost: Callable[[list[tuple[int, int]]], float], stages: int = 1,
                 hop_seconds: Callable[[int], float] = lambda tokens: 0.0,
                 return_seconds: Callable[[int], float] = lambda rows: 0.0) -> None:
        self.clock, self.stage_cost, self.depth = clock, stage_cost, stages
        self.hop_seconds, self.return_seconds = hop_seconds, return_seconds
        self.free = [0.0] * stages  # when each stage finishes the last step it took
        self.in_flight: deque[tuple[float, StepPlan]] = deque()

    def submit(self, plan: StepPlan) -> None:
        t, seconds = self.clock.now(), self.stage_cost([(r.start, r.count) for r in plan.rows])
        for s in range(self.depth):
            t = self.free[s] = max(t, self.free[s]) + seconds
            t += self.hop_seconds(plan.tokens) if s < self.depth - 1 else 0.0
        self.in_flight.append((t + (self.return_seconds(len(plan.rows)) if self.depth > 1 else 0.0), plan))
        self.clock.wait_until(self.free[0])

    def collect(self) -> dict[int, int]:
        done, plan = self.in_flight.popleft()
        self.clock.wait_until(done)
        return {r.seq.id: PLACEHOLDER_TOKEN for r in plan.rows if r.emits}


def simulate(requests: list[Request], config: SchedulerConfig, step_cost: Callable[[list[tuple[int, int]]], float],
             slo: SLO = SLO(), concurrency: int | None = None, stages: int = 1,
             hop_seconds: Callable[[int], float] = lambda tokens: 0.0,
             return_seconds: Callable[[int], float] = lambda rows: 0.0) -> ServeRun:
    """Serve ``requests`` on a virtual clock; each step takes ``step_cost([(start, count), ...])`` seconds.
    ``concurrency``: a closed loop of that many requests in flight (:func:`~tplab.serving.loop.run_load`).
    ``stages`` > 1: ``step_cost`` prices one stage's share, and up to ``stages`` steps are in flight
    (:class:`VirtualPipeline`)."""
    clock = VirtualClock()
    pipeline = VirtualPipeline(clock, step_cost, stages, hop_seconds, return_seconds)
    return run_load(requests, config, pipeline, clock, frozenset(), slo, concurrency)
