"""Serving requests under load: the whole feature, from a request to the engine on ranks and the simulator.

Pure Python (no torch; a test holds these to it), what the engine plans with and the simulator replays:

* ``requests``: :class:`Request` (what a user sends) and :class:`Sequence` (its state while it runs);
* ``blocks``: :class:`BlockManager`, block tables with reference counts and a prefix cache;
* ``scheduler``: :class:`Scheduler`, continuous batching with chunked prefill, admission control and
  preemption by recompute (or static batching, to compare);
* ``loop``: one serving loop, on a wall clock (the engine) or a virtual one (the simulator);
* ``load``: a load generator (Poisson or all at once; fixed, ranged or replayed lengths);
* ``metrics``: TTFT, TPOT, latency and queueing per request; percentiles, throughput, goodput under an SLO;
* ``step_cost`` and ``simulator``: the same scheduler on a virtual clock, each step's time from a cost function.

On ranks (torch):

* ``plan``: a step's plan as one int64 tensor, broadcast from rank 0 to the others;
* ``engine``: :func:`serve`, rank 0's scheduler plans each step and every rank runs it on its paged cache;
* ``static``: static batches through the generation loop, the baseline continuous batching is measured against.
"""
from tplab.serving.engine import serve, serve_rank_program
from tplab.serving.requests import Request, Sequence
from tplab.serving.scheduler import Scheduler, SchedulerConfig, StepPlan
from tplab.serving.simulator import simulate

__all__ = ["Request", "Scheduler", "SchedulerConfig", "Sequence", "StepPlan", "serve", "serve_rank_program",
           "simulate"]
