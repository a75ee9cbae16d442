"""A mixture's experts measured on CPU ranks: each split's decode time, the bytes and seconds its MoE layers spend in
collectives, and where the router sent the tokens.

:func:`measure_split` runs the generation loop with the experts split over the tp ranks (ep = 1), or whole on each
(ep = tp) with the tokens replicated (all-reduce) or dispatched (all-to-all), and keeps the repeat with the lowest
decode ms/token. Per decode step and MoE layer, on rank 0:

* all-reduce forms: one all-reduce of the layer's tokens, the same as attention's (a forward pass runs
  2 · layers + 1 of them, all of one size), so the MoE's share is one of them: bytes and seconds per all-reduce;
* all-to-all form: three all-to-alls and one all-gather of the expert group per layer: their bytes and seconds
  over the layers.

The routing is the run's (:func:`tplab.model.routing.routing_summary`): pairs per expert and per rank, and the
imbalance per step and layer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from tplab.bench.timing import fastest_generation
from tplab.engine.generate import GenerationResult
from tplab.model.routing import routing_summary, run_counts
from tplab.specs.model import ModelConfig


@dataclass(frozen=True)
class SplitRun:
    """The best of several repeats of one placement of the experts."""

    tp: int
    ep: int
    dispatch: str
    batch: int
    decode_ms_per_token: float
    moe_bytes_per_layer: float  # per decode step and MoE layer, on rank 0: what its collectives carried
    moe_seconds_per_layer: float  # per decode step and MoE layer, on rank 0: the time in them
    moe_ops_per_layer: dict[str, float]  # {op: count per decode step and layer}
    routing: dict  # routing_summary of the whole run
    tokens: list[list[int]]

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "tokens"}


def moe_collectives(result: GenerationResult, layers: int, dispatch: str) -> tuple[float, float, dict[str, float]]:
    """(bytes, seconds, {op: count}) of one MoE layer's collectives per decode step, from rank 0's decode records
    (see the module docstring)."""
    steps = result.decode_steps
    if dispatch == "all-reduce":
        ops = result.comm["decode"].get("all_reduce")
        if ops is None:  # one rank: no collective moves data, but the count still holds
            return 0.0, 0.0, {}
        count = ops["count"]
        return ops["bytes"] / count, ops["seconds"] / count, {"all_reduce": 1.0}
    ops = result.expert_comm["decode"]
    per = steps * layers
    return (sum(o["bytes"] for o in ops.values()) / per, sum(o["seconds"] for o in ops.values()) / per,
            {op: o["count"] / per for op, o in ops.items()})


def measure_split(model: str | Path | ModelConfig, prompts: list[list[int]], new_tokens: int, tp: int = 1,
                  ep: int = 1, dispatch: str = "all-reduce", backend: str = "threads", repeats: int = 3,
                  threads: int | None = 1) -> SplitRun:
    """Generate ``new_tokens`` for every prompt ``repeats`` times (each after an untimed warm-up) with the experts
    placed as asked; the fastest repeat. ``model``: a checkpoint directory, "tiny-moe", or its ModelConfig."""
    best = fastest_generation(repeats, tp, backend, threads, ep=ep, model=model, prompts=prompts,
                              max_new_tokens=new_tokens, expert_dispatch=dispatch)
    first = best[0]
    layers = len(first.step_expert_tokens[0])
    nbytes, seconds, ops = moe_collectives(first, layers, dispatch)
    routing = routing_summary(run_counts([r.step_expert_tokens for r in best], tp, ep), ep)
    return SplitRun(tp, ep, dispatch, len(prompts), first.ms_per_token, nbytes, seconds, ops, routing, first.tokens)
