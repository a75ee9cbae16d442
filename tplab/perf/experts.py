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

So the all-to-all form carries about 2 k / p + 1 times the all-reduce's payload here: with tokens that every rank
holds anyway (TP attention), dispatching them costs more than reducing. It pays where the tokens are partitioned
already (data-parallel attention: no all-gather) and the group is large (2 k / p falls below the ring's 2 (p-1)/p).
These are the payloads :class:`~tplab.comm.stats.CommStats` records (the tests assert them exactly, summed over
the group's ranks) and the bytes on the wire; neither says how long they take (:mod:`tplab.perf.comm`).
"""
from __future__ import annotations

import math

from tplab.specs.sharding import EXPERT_DISPATCH

EXPERT_ID_BYTES = 8  # an int64 expert id travels with every dispatched pair


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
