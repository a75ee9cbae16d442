"""The scheduler: which sequences run in the next step, and how many tokens each feeds. Pure Python.

Each step (vLLM v1's unified scheme, as in nano-vllm):

1. **Running first**, oldest first. Each running sequence feeds its tokens
   still to compute: 1 for a decode, the rest of its prompt (up to the step's
   remaining token budget) for a prefill, so a long prompt is split across
   steps (*chunked prefill*) and batched with the running decodes. When its
   next block cannot be had, the newest running sequence is *preempted*: its
   blocks are freed, it goes back to the front of the waiting queue, and
   later recomputes its prompt and outputs. The engine never deadlocks on a full cache.
2. **Then waiting**, first come first served, while fewer than
   ``max_num_seqs`` run (admission control) and budget and blocks remain:
   its cached prefix blocks are reused (:mod:`tplab.serving.blocks`) and it
   feeds as much of the rest as the budget allows. A preemption this step
   stops admissions.

``max_num_batched_tokens`` bounds the tokens of one step (decodes plus
prefill chunks).

With pipeline stages several steps are in flight at once (the ``depth`` of
:func:`tplab.serving.loop.run_load`'s step queue). A sequence in a step whose
result has not come back is *in flight*: it is skipped (its next token is not
known yet) and never preempted. ``max_num_seqs`` counts it (one scheduler feeds
every step in flight, as in vLLM v1), and each step takes at most its share of
the sequences, so that the steps in flight carry about as many each (vLLM v0
gave each of its pp "virtual engines" requests of its own).

``policy="static"`` is static batching for comparison: a new
batch of up to ``max_num_seqs`` requests starts only when the last has
finished, each prompt prefilled whole in one step; a finished sequence leaves
the batch (kinder to static batching than padded generation, whose finished
rows keep computing). ``policy="padded"`` is that padded generation, as a
``generate()`` call runs it: the engine runs it through the generation loop
(:mod:`tplab.serving.static`), not through this scheduler.

A request that can never run is rejected when it arrives, with its reason:
longer than ``max_model_len``, or more blocks than the whole cache.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from tplab.checks import check_int
from tplab.serving.blocks import BlockManager, check_block_size
from tplab.serving.requests import Request, Sequence

POLICIES = ("continuous", "static", "padded")


@dataclass(frozen=True)
class SchedulerConfig:
    """Admission cap, token budget per step, cache geometry, prefix caching, chunking and policy."""

    max_num_seqs: int = 8
    max_num_batched_tokens: int = 256
    num_blocks: int = 64
    block_size: int = 16
    max_model_len: int = 256
    prefix_caching: bool = True
    chunked_prefill: bool = True
    policy: str = "continuous"

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "num_blocks", "max_model_len"):
            check_int(name, getattr(self, name))
        check_block_size("block_size", self.block_size)
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {POLICIES}")
        if not self.chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"without chunked prefill, max_num_batched_tokens={self.max_num_batched_tokens} must be "
                             f">= max_model_len={self.max_model_len}, or a long prompt could never be scheduled")

    def check_context(self, context: int) -> None:
        """ValueError when ``max_model_len`` exceeds the model's ``context`` (its max_position_embeddings): a
        request longer than the model's positions would pass admission and fail on a rank."""
        if self.max_model_len > context:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's context of {context} positions: "
                             f"give max_model_len <= {context}")


def check_serving(policy: str, concurrency: int | None, pp: int = 1, compiled_attention: bool = False) -> None:
    """ValueError when the policy cannot run as asked: padded generation serves fixed batches in arrival order
    through the generation loop, so it has no closed loop (``concurrency`` requests in flight; None: an open loop),
    no steps in flight across pipeline stages (``pp`` > 1) and no paged cache (``compiled_attention``)."""
    if concurrency is not None and policy == "padded":
        raise ValueError("policy 'padded' serves fixed batches in arrival order: --concurrency needs continuous or "
                         "static")
    if pp > 1 and policy == "padded":
        raise ValueError(f"policy 'padded' runs the generation loop on one stage: --pp {pp} needs continuous or "
                         "static")
    if compiled_attention and policy == "padded":
        raise ValueError("policy 'padded' runs the generation loop over a static cache: --compile (the paged "
                         "attention kernel) needs continuous or static")


@dataclass
class ScheduledRow:
    """One row of a step: ``seq`` feeds ``tokens[start:start + count]``; it emits a token when that reaches its end."""

    seq: Sequence
    start: int
    count: int

    @property
    def emits(self) -> bool:
        return self.start + self.count == len(self.seq.tokens)

    @property
    def decode(self) -> bool:
        """A decode: one token, an output sampled earlier (a prompt's tokens are a prefill)."""
        return self.count == 1 and self.start >= len(self.seq.request.prompt)


@dataclass
class StepPlan:
    rows: list[ScheduledRow] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(r.count for r in self.rows)

    @property
    def decodes(self) -> int:
        """Rows feeding the one token they sampled last."""
        return sum(1 for r in self.rows if r.decode)


class Scheduler:
    """Waiting and running queues over one :class:`BlockManager`; :meth:`schedule` then :meth:`update` each step."""

    def __init__(self, config: SchedulerConfig) -> None:
        if config.policy == "padded":
            raise ValueError("policy 'padded' runs static batches through the generation loop on real ranks "
                             "(serve-bench); the scheduler and the simulator run 'continuous' or 'static'")
        self.config = config
        self.blocks = BlockManager(config.num_blocks, config.block_size, config.prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.finished: list[Sequence] = []
        self.preemptions = 0

    def rejection(self, request: Request) -> str | None:
        """Why ``request`` can never run here, or None."""
        cfg = self.config
        if request.max_tokens > cfg.max_model_len:
            return (f"prompt {len(request.prompt)} + max_new_tokens {request.max_new_tokens} = {request.max_tokens} "
                    f"positions exceed max_model_len={cfg.max_model_len}")
        if self.blocks.blocks_for(request.max_tokens) > cfg.num_blocks:
            return (f"{request.max_tokens} positions need {self.blocks.blocks_for(request.max_tokens)} blocks of "
                    f"{cfg.block_size}; the cache has {cfg.num_blocks}")
        return None

    def add(self, request: Request, now: float) -> Sequence:
        """Queue ``request`` (it arrived at ``now``); one that can never run is finished at once, rejected."""
        seq = Sequence(request)
        reason = self.rejection(request)
        if reason is not None:
            seq.finish_reason, seq.finished_s = f"rejected: {reason}", now
            self.finished.append(seq)
        else:
            self.waiting.append(seq)
        return seq

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.num_computed, seq.preemptions = 0, seq.preemptions + 1
        self.waiting.appendleft(seq)
        self.preemptions += 1
        plan.preempted.append(seq)

    def schedule(self, now: float, lanes: int = 1) -> StepPlan:
        """The next step's rows; each row's blocks are allocated for the tokens it feeds. ``lanes``: steps in flight
        at once (pipeline stages); a step then takes at most ⌈min(running + waiting, max_num_seqs) / lanes⌉
        sequences, so that the steps in flight share them evenly (with one lane the bound never binds)."""
        plan, budget, blocks = StepPlan(), self.config.max_num_batched_tokens, self.blocks
        static = self.config.policy == "static"
        limit = math.ceil(min(len(self.running) + len(self.waiting), self.config.max_num_seqs) / lanes)
        for seq in list(self.running):
            if seq not in self.running or seq.in_flight or (budget <= 0 and not static) or len(plan.rows) >= limit:
                continue
            count = seq.to_compute if static else min(seq.to_compute, budget)
            while not blocks.can_grow(seq, count):  # the newest running sequence not in flight gives way
                self._preempt(next(s for s in reversed(self.running) if not s.in_flight), plan)
                if seq not in self.running:
                    break
            if seq in self.running:
                blocks.grow(seq, count)
                plan.rows.append(ScheduledRow(seq, seq.num_computed, count))
                seq.in_flight = True
                budget -= count
        if plan.preempted or (static and self.running):
            return plan
        while (self.waiting and len(self.running) < self.config.max_num_seqs and (budget > 0 or static)
               and len(plan.rows) < limit):
            seq = self.waiting[0]
            cached = blocks.cached_prefix(seq)
            rest = len(seq.tokens) - len(cached) * blocks.block_size
            count = rest if static or not self.config.chunked_prefill else min(rest, budget)
            if (count > budget and not static) or not blocks.can_admit(seq, count, cached):
                break
            self.waiting.popleft()
            blocks.admit(seq, cached)
            blocks.grow(seq, count)
            if seq.first_scheduled_s is None:
                seq.first_scheduled_s = now
            self.running.append(seq)
            plan.rows.append(ScheduledRow(seq, seq.num_computed, count))
            seq.in_flight = True
            budget -= count
        return plan

    def update(self, plan: StepPlan, new_tokens: dict[int, int], now: float, eos: frozenset[int]) -> list[Sequence]:
        """Apply a step that ran: rows advance, emitting rows append ``new_tokens[seq.id]``; the newly finished."""
        done = []
        for row in plan.rows:
            seq = row.seq
            seq.num_computed, seq.in_flight = row.start + row.count, False
            self.blocks.register_full(seq)
            if not row.emits:
                continue
            seq.tokens.append(new_tokens[seq.id])
            seq.token_times_s.append(now)
            reason = finish_reason(seq, eos)
            if reason is not None:
                seq.finish_reason, seq.finished_s = reason, now
                self.running.remove(seq)
                self.blocks.release(seq)
                self.finished.append(seq)
                done.append(seq)
        return done


def finish_reason(seq: Sequence, eos: frozenset[int]) -> str | None:
    """"eos" when the last output is an EOS id, "stop" when the outputs end with a stop sequence, "length" at the cap."""
    outputs = seq.outputs
    if outputs and outputs[-1] in eos:
        return "eos"
    if any(s and tuple(outputs[-len(s):]) == tuple(s) for s in seq.request.stop):
        return "stop"
    if len(outputs) >= seq.request.max_new_tokens:
        return "length"
    return None
