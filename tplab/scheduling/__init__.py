"""Serving requests under load, in pure Python (no torch): what the engine runs and the simulator replays.

* ``requests``: :class:`Request` (what a user sends) and :class:`Sequence` (its state while it runs);
* ``blocks``: :class:`BlockManager`, block tables with reference counts and a prefix cache;
* ``scheduler``: :class:`Scheduler`, continuous batching with chunked prefill, admission control and
  preemption by recompute (or static batching, to compare);
* ``load``: a load generator (Poisson or all at once; fixed, ranged or replayed lengths);
* ``metrics``: TTFT, TPOT, latency and queueing per request; percentiles, throughput, goodput under an SLO;
* ``step_cost`` and ``simulator``: the same scheduler on a virtual clock, each step's time from a cost function.

The engine that runs these plans on tp ranks is :mod:`tplab.engine.serve`.
"""
from tplab.scheduling.requests import Request, Sequence
from tplab.scheduling.scheduler import Scheduler, SchedulerConfig, StepPlan

__all__ = ["Request", "Scheduler", "SchedulerConfig", "Sequence", "StepPlan"]
