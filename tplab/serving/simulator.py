"""The simulator: the engine's scheduler and metrics on a virtual clock, each step priced instead of run.

:func:`simulate` runs :func:`tplab.serving.loop.run_load`, the loop the
engine runs, with a :class:`~tplab.serving.loop.VirtualClock` that a step
advances by ``step_cost(rows)``, rows being [(context, new tokens), ...]. The
cost is modelled for GPUs (:class:`tplab.perf.batch.ModelledStepCost`) or
fitted to an engine's measured steps (:func:`tplab.serving.step_cost.fit_step_cost`).
No model runs, so no token is known: every request runs to its
``max_new_tokens`` (no EOS), and a simulated run's outputs are placeholders.
"""
from __future__ import annotations

from typing import Callable

from tplab.serving.loop import ServeRun, VirtualClock, run_load
from tplab.serving.metrics import SLO
from tplab.serving.requests import Request
from tplab.serving.scheduler import SchedulerConfig, StepPlan

PLACEHOLDER_TOKEN = -1


def simulate(requests: list[Request], config: SchedulerConfig, step_cost: Callable[[list[tuple[int, int]]], float],
             slo: SLO = SLO(), concurrency: int | None = None) -> ServeRun:
    """Serve ``requests`` on a virtual clock; each step takes ``step_cost([(start, count), ...])`` seconds.
    ``concurrency``: a closed loop of that many requests in flight (:func:`~tplab.serving.loop.run_load`)."""
    clock = VirtualClock()

    def step(plan: StepPlan) -> dict[int, int]:
        clock.advance(step_cost([(r.start, r.count) for r in plan.rows]))
        return {r.seq.id: PLACEHOLDER_TOKEN for r in plan.rows if r.emits}

    return run_load(requests, config, step, clock, frozenset(), slo, concurrency)
