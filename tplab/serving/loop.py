"""The serving loop, one for the engine and the simulator: arrivals in, a plan per step, metrics out.

    while requests are pending or running:
        admit the requests that have arrived by now (closed loop: while fewer than N are in flight)
        plan = scheduler.schedule(now)        # rows: (sequence, first token, count)
        new tokens = step(plan)               # the engine runs it on tp ranks; the simulator prices it
        scheduler.update(plan, new tokens, now)

With pipeline stages the loop keeps up to ``depth`` plans in flight (one per stage, as vLLM's engine does): it
submits a plan, and collects the oldest only when ``depth`` are in flight or nothing else can be scheduled.

The engine passes a :class:`WallClock` and a :class:`StepQueue` that runs each plan on real ranks
(:mod:`tplab.serving.engine`); the simulator a :class:`VirtualClock`, advanced by each step's modelled or fitted
time through its stages (:mod:`tplab.serving.simulator`).
Everything else, and so every metric, is the same code.

Open or closed loop. By default a request is sent when it arrives (``arrival_s``: all at once, a Poisson process
or a replayed trace). With ``concurrency`` N the client keeps at most N requests in flight, as genai-perf and
``vllm bench serve --max-concurrency`` do: a request that has arrived waits on the client until one in flight
finishes, and its times (TTFT, latency) count from when it is sent, not from its arrival.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Protocol

from tplab.checks import check_int
from tplab.serving.metrics import SLO, run_metrics
from tplab.serving.requests import Request
from tplab.serving.scheduler import Scheduler, SchedulerConfig, StepPlan


class WallClock:
    """Seconds since the run started, by ``time.perf_counter``; waiting sleeps."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.started

    def wait_until(self, t: float) -> None:
        time.sleep(max(0.0, t - self.now()))


class VirtualClock:
    """A clock that moves only when told: by a step's time, or to the next arrival."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def wait_until(self, t: float) -> None:
        self.t = max(self.t, t)

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class ServeRun:
    """A finished run: ``requests`` in input order (see :func:`~tplab.serving.metrics.request_metrics`),
    the ``summary``, per step (time, rows, tokens, decodes, attended keys, seconds) for calibration, and
    ``scheduler_s``: the host seconds spent planning and updating (wall time on either clock)."""

    requests: list[dict]
    summary: dict
    steps: list[dict] = field(default_factory=list)
    utilization: list[tuple[float, float]] = field(default_factory=list)
    scheduler_s: float = 0.0

    def to_dict(self) -> dict:
        return {"requests": self.requests, "summary": self.summary}


def attended_keys(start: int, count: int) -> int:
    """Query-key pairs of a row feeding ``count`` tokens after ``start`` cached ones: count·start + count(count+1)/2."""
    return count * start + count * (count + 1) // 2


class StepQueue(Protocol):
    """Where the loop's plans run: up to ``depth`` of them at once, their tokens collected in the order submitted."""

    depth: int

    def submit(self, plan: StepPlan) -> None: ...

    def collect(self) -> dict[int, int]: ...


def run_load(requests: list[Request], config: SchedulerConfig, steps: StepQueue,
             clock: WallClock | VirtualClock, eos: frozenset[int] = frozenset(), slo: SLO = SLO(),
             concurrency: int | None = None) -> ServeRun:
    """Serve ``requests`` (arriving at their ``arrival_s``) with ``steps`` running each plan; the metrics.

    ``steps``: a :class:`StepQueue` that holds up to ``depth`` plans in flight (1 without pipeline stages; with
    them, while stage 2 runs one step, stage 1 runs the next). The loop submits plans while
    fewer than ``depth`` are in flight and the scheduler finds rows not in flight, and otherwise collects the
    oldest. ``concurrency``: at most that many requests in flight (closed loop; see the module docstring)."""
    if concurrency is not None:
        check_int("concurrency", concurrency)
    scheduler = Scheduler(config)
    pending = deque(sorted(requests, key=lambda r: (r.arrival_s, r.id)))
    sent = {}  # closed loop: each request as sent, its arrival_s the time it was sent
    sequences, records, utilization, in_flight, scheduler_s = {}, [], [], deque(), 0.0
    while pending or scheduler.has_work:
        now = clock.now()
        while pending and pending[0].arrival_s <= now and (
                concurrency is None or len(scheduler.waiting) + len(scheduler.running) < concurrency):
            request = pending.popleft()
            if concurrency is not None:
                request = sent[request.id] = replace(request, arrival_s=now)
            sequences[request.id] = scheduler.add(request, now)
        if not scheduler.has_work:
            if pending:
                clock.wait_until(pending[0].arrival_s)
            continue
        planning = time.perf_counter()
        plan = scheduler.schedule(now, steps.depth) if len(in_flight) < steps.depth else StepPlan()
        scheduler_s += time.perf_counter() - planning
        if plan.rows:
            steps.submit(plan)
            in_flight.append((plan, now))
        elif not in_flight:
            raise RuntimeError("the scheduler planned an empty step with work waiting (a scheduler bug)")
        if plan.rows and len(in_flight) < steps.depth:
            continue
        plan, started = in_flight.popleft()
        tokens = steps.collect()
        done = clock.now()
        records.append({"t": started, "rows": len(plan.rows), "tokens": plan.tokens, "decodes": plan.decodes,
                        "attended": sum(attended_keys(r.start, r.count) for r in plan.rows),
                        "seconds": done - started})
        planning = time.perf_counter()
        scheduler.update(plan, tokens, done, eos)
        scheduler_s += time.perf_counter() - planning
        utilization.append((done, scheduler.blocks.used / config.num_blocks))
    blocks = scheduler.blocks
    rows, summary = run_metrics([sent.get(r.id, r) for r in requests], sequences, scheduler.preemptions,
                                blocks.hits / blocks.lookups if blocks.lookups else None, utilization, slo, len(records))
    return ServeRun(rows, summary, records, utilization, scheduler_s)
