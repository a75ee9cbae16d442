"""What one MoE layer's collectives carry under each way of placing the experts (:mod:`tplab.model.moe`).

N tokens of hidden size h and b bytes per element pass one MoE layer with k experts per token, on a group of p
ranks (p = tp; with whole experts p = ep = tp):

* **TP of the experts** and **EP, tokens replicated**: one all-reduce of the N x h output. Each rank hands N h b
  bytes to it; a ring moves 2 (p-1)/p N h b bytes out of every rank.
* **EP, tokens partitioned** (all-to-all): each rank owns c = ⌈N/p⌉ of the tokens. It sends each of its
  (token, expert) pairs, about N k / p of them, to the expert's rank: an expert id (8 bytes, int64) and the hidden
  vector (h b), and gets each pair's output back (h b): N k / p (8 + 2 h b) bytes of all-to-all, of which
  (p-1)/p leave the rank when the experts are chosen uniformly. Then an all-gather of c x h per rank: p c h b
  bytes out, (p-1) c h b of them from the others.

So the all-to-all form hands over 2 k / p + 1 times the all-reduce's payload, and puts (2 k / p + 1) / 2 times
the ring's bytes on the wire: fewer only when p > 2 k (Mixtral's k = 2 from 5 ranks on; Qwen3's k = 8 from 17).
With tokens that every rank holds anyway (TP attention) dispatching them rarely pays on bytes; it pays where the
tokens are partitioned already (data-parallel attention: no all-gather) and the group is large.
These are the payloads :class:`~tplab.comm.stats.CommStats` records (the tests assert them exactly, summed over
the group's ranks) and the bytes on the wire; neither says how long they take (:mod:`tplab.perf.comm`).

What a step reads and computes (used by :func:`tplab.perf.shapes.step_work`), under **uniform routing** (each
pair's expert drawn evenly; a trained router is less even, so pass a measured ``imbalance`` where you have one):

* memory counts every expert: E · 3 h I_e / tp parameters per layer and rank, the same whether each expert is split
  over the tp ranks or E/tp of them are whole;
* a layer's N tokens touch a fraction f = 1 - (1 - k/E)^N of the experts, so a decode step reads that fraction of
  the expert weights (all of them once N is large);
* compute counts the active pairs: 2 · N k · 3 h I_e / tp FLOPs per layer and rank with the experts split;
* with whole experts the busiest rank sets the pace: it gets ``imbalance`` = max_r C_r / mean_r C_r times the mean
  pairs (:func:`rank_imbalance`), so it computes that much more, and reads min(1, f · imbalance) of its experts.
  At batch 1 with k = 2 of E = 8 experts on 8 ranks, one rank holds a whole chosen expert and reads all of it,
  where TP of experts reads a quarter of two experts' slices per rank: EP loses at small batches, and catches up
  as the batch fills every expert.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tplab.specs.model import ModelConfig
from tplab.specs.sharding import EXPERT_DISPATCH, check_dispatch

EXPERT_ID_BYTES = 8  # an int64 expert id travels with every dispatched pair
ROUTINGS = ("uniform", "collapsed")


def layer_payload(tokens: int, hidden: int, top_k: int, ranks: int, dispatch: str, element_bytes: float
                  ) -> dict[str, float]:
    """{op: bytes one rank hands to it} for one MoE layer, averaged over the ``ranks`` of the group (see the module
    docstring); the all-to-all's share per rank is exact on average (the group sends N k pairs in all)."""
    if dispatch not in EXPERT_DISPATCH:
        raise ValueError(f"unknown expert dispatch {dispatch!r}; one of {', '.join(EXPERT_DISPATCH)}")
    if dispatch == "all-reduce":
        return {"all_reduce": tokens * hidden * element_bytes}
    pairs = tokens * top_k / ranks
    return {"all_to_all": pairs * (EXPERT_ID_BYTES + 2 * hidden * element_bytes),
            "all_gather": math.ceil(tokens / ranks) * ranks * hidden * element_bytes}


def layer_wire_bytes(tokens: int, hidden: int, top_k: int, ranks: int, dispatch: str, element_bytes: float) -> float:
    """Bytes that leave one rank per MoE layer: a ring all-reduce's 2 (p-1)/p of the payload; of the all-to-all,
    the (p-1)/p that goes to other ranks under uniform routing; of the all-gather, the (p-1)/p from the others."""
    share = (ranks - 1) / ranks
    payload = layer_payload(tokens, hidden, top_k, ranks, dispatch, element_bytes)
    if dispatch == "all-reduce":
        return 2 * share * payload["all_reduce"]
    return share * (payload["all_to_all"] + payload["all_gather"])


@dataclass(frozen=True)
class ExpertSplit:
    """How a mixture's experts sit on the tp ranks: ``ep`` 1 (every expert split over them) or tp (whole experts,
    their tokens reaching them by ``dispatch``). ``imbalance``: the busiest rank's pairs over the mean, measured
    (e.g. ``generate --json``'s routing); None: the expectation under ``routing``: "uniform" (each pair's expert
    drawn evenly, :func:`rank_imbalance`) or "collapsed" (every token to the same k experts, as a router with
    constant or random weights can do: a step touches k/E of the experts, and the ranks that hold them get all
    the pairs)."""

    ep: int = 1
    dispatch: str = "all-reduce"
    imbalance: float | None = None
    routing: str = "uniform"  # or "collapsed": every token to the same k experts (a constant router)

    def check(self, model: ModelConfig, tp: int) -> None:
        """ValueError unless the model and tp allow this split (:meth:`ModelConfig.check_ep`, the dispatch, an
        imbalance >= 1, a known routing)."""
        model.check_ep(tp, self.ep)
        check_dispatch(self.dispatch, tp, self.ep)
        if self.routing not in ROUTINGS:
            raise ValueError(f"unknown routing {self.routing!r}; one of {', '.join(ROUTINGS)}")
        if self.imbalance is not None and not (isinstance(self.imbalance, (int, float)) and self.imbalance >= 1):
            raise ValueError(f"imbalance is the busiest rank's share over the mean: a number >= 1, got "
                             f"{self.imbalance!r}")


def expert_layer_params(model: ModelConfig, tp: int) -> int:
    """Parameters of one MoE layer's experts on one rank: E · 3 h I_e / tp, plus the shared expert's 3 h I_s / tp."""
    h = model.hidden_size
    return 3 * h * (model.num_experts * model.expert_intermediate_size + model.shared_expert_intermediate_size) // tp


def touched_fraction(tokens: float, top_k: int, experts: int) -> float:
    """f = 1 - (1 - k/E)^N: the expected share of the experts that N tokens' pairs reach (uniform routing)."""
    return 1 - (1 - top_k / experts) ** tokens


def rank_imbalance(tokens: float, top_k: int, experts: int, ranks: int) -> float:
    """The expected max_r C_r / mean_r C_r of the pairs per rank, N k pairs spread evenly at random over ``ranks``
    (each holding E/ranks experts): mean m = N k / r, standard deviation s = sqrt(N k (1/r)(1 - 1/r)), the
    expected maximum of r such counts about m + s sqrt(2 ln r), at least ⌈m⌉ and at most N min(k, E/r) (a token
    sends at most min(k, E/r) pairs to one rank). 1 for one rank."""
    if ranks == 1 or tokens <= 0:
        return 1.0
    mean = tokens * top_k / ranks
    spread = math.sqrt(tokens * top_k * (1 / ranks) * (1 - 1 / ranks))
    busiest = min(mean + spread * math.sqrt(2 * math.log(ranks)), tokens * min(top_k, experts // ranks))
    return max(busiest, math.ceil(mean)) / mean


def routed_shares(split: ExpertSplit, tokens: float, top_k: int, experts: int) -> tuple[float, float]:
    """(touched, imbalance) of a step of ``tokens`` tokens: the share of the experts it reaches and the busiest
    rank's pairs over the mean (1 with the experts split over the ranks), under ``split.routing`` unless
    ``split.imbalance`` is given."""
    if split.routing == "collapsed":
        touched, busiest = top_k / experts, split.ep / min(top_k, split.ep)
    else:
        touched, busiest = touched_fraction(tokens, top_k, experts), rank_imbalance(tokens, top_k, experts, split.ep)
    return touched, 1.0 if split.ep == 1 else split.imbalance or busiest
