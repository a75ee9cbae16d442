"""Static batching through the generation loop: the baseline continuous batching is measured against.

What tplab did before its serving engine, and what a server built on a
``generate()`` call does: when the ranks are idle, rank 0 takes up to
``max_num_seqs`` requests that have arrived (first come, first served) and
broadcasts their ids; every rank runs :func:`tplab.engine.generate` on them as
one left-padded batch (the prompts padded to the longest), every row stepping
until the longest is done (a row's outputs past its own ``max_new_tokens``
are dropped); requests arriving meanwhile wait for the next batch. So static
batching pays twice: slots idle while the batch's longest request runs, and
compute spent on padding and on rows that are already done.

Greedy decoding only. A request's times come from the loop's step times: its
i-th token at the batch's start plus the first i + 1 step times.
"""
from __future__ import annotations

from itertools import accumulate

from tplab.engine.generate import generate
from tplab.model.decoder import TPCausalLM
from tplab.serving.loop import ServeRun, WallClock
from tplab.serving.metrics import SLO, run_metrics
from tplab.serving.plan import share_plan
from tplab.serving.requests import Request, Sequence


def _generate_batch(model: TPCausalLM, batch: list[Request], eos: frozenset[int]):
    return generate(model, [list(r.prompt) for r in batch], max(r.max_new_tokens for r in batch),
                    eos_token_ids=tuple(eos))


def serve_static(model: TPCausalLM, requests: list[Request], max_num_seqs: int, eos: frozenset[int],
                 slo: SLO = SLO()) -> ServeRun | None:
    """Serve ``requests`` in static batches on every rank; rank 0 returns the run, the others None."""
    dist, by_id = model.dist, {r.id: r for r in requests}
    if any(r.temperature > 0 for r in requests):
        raise ValueError("static batching here is greedy only; give the requests temperature 0")
    if dist.rank != 0:
        while ids := share_plan(dist, None):
            _generate_batch(model, [by_id[i] for i in ids], eos)
        return None
    clock, waiting, sequences, steps = WallClock(), sorted(requests, key=lambda r: (r.arrival_s, r.id)), {}, 0
    while waiting:
        clock.wait_until(waiting[0].arrival_s)
        now = clock.now()
        arrived = sum(1 for r in waiting if r.arrival_s <= now)  # a prefix: the queue is sorted by arrival
        batch, waiting = waiting[:min(arrived, max_num_seqs)], waiting[min(arrived, max_num_seqs):]
        share_plan(dist, [r.id for r in batch])
        result = _generate_batch(model, batch, eos)
        steps += len(result.step_seconds)
        times = [now + t for t in accumulate(result.step_seconds)]
        for request, tokens, reason in zip(batch, result.tokens, result.finish_reasons):
            kept = tokens[:request.max_new_tokens]
            sequences[request.id] = Sequence(
                request, list(request.prompt) + kept, finish_reason=reason if kept == tokens else "length",
                first_scheduled_s=now, token_times_s=times[:len(kept)], finished_s=times[len(kept) - 1])
    share_plan(dist, None)
    rows, summary = run_metrics(requests, sequences, 0, None, [], slo, steps)
    return ServeRun(rows, summary)
