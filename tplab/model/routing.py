"""Where a mixture's router sent the tokens: counts per expert and per rank, and their imbalance.

A step of a mixture with E experts and k experts per token sends N·k (token, expert) pairs through each MoE
layer. c_e is how many went to expert e; with ep ranks each holding E/ep whole experts, rank r receives
C_r = sum of c_e over its experts. The time of an expert-parallel layer is set by its busiest rank, so what
matters is the **imbalance** max_r C_r / mean_r C_r (1 when balanced, ep when one rank gets everything); for the
experts themselves, max_e c_e / mean_e c_e. Both are measured per (step, layer) and averaged, because a rank
waits at every layer of every step; the run's totals (``tokens_per_expert``) show which experts the model
prefers over the whole run, a different thing (a balanced run can still route every step unevenly).

The counts come from each rank's experts (:attr:`tplab.model.moe.TPMoE.tokens_per_expert`): with the experts
split over the ranks (ep = 1) every rank computes a slice of every pair, so any one rank's counts are the
layer's; with whole experts (ep > 1) each rank counts its own experts' pairs, and the ranks' counts add up.
"""
from __future__ import annotations

import torch


def layer_counts(per_rank: list[torch.Tensor], ep: int) -> torch.Tensor:
    """The counts (..., E) of the whole layer from each rank's counts of one TP group: rank 0's at ep = 1 (every
    rank computed a slice of every pair), their sum at ep > 1 (each rank its own experts)."""
    return per_rank[0] if ep == 1 else torch.stack(per_rank).sum(0)


def imbalance(counts: torch.Tensor) -> float:
    """mean over every leading index (step, layer) of max / mean over the last axis; rows with no pair skipped.
    1.0 when balanced."""
    rows = counts.reshape(-1, counts.shape[-1]).double()
    rows = rows[rows.sum(-1) > 0]
    if not len(rows):
        return 1.0
    return float((rows.max(-1).values / rows.mean(-1)).mean())


def per_rank(counts: torch.Tensor, ranks: int) -> torch.Tensor:
    """(..., ranks): the counts (..., E) summed over each rank's E/ranks consecutive experts."""
    return counts.reshape(*counts.shape[:-1], ranks, -1).sum(-1)


def run_counts(step_counts: list[list[list[list[int]]]], tp: int, ep: int) -> torch.Tensor:
    """(steps, layers, E) for a whole run from every rank's ``GenerationResult.step_expert_tokens`` (global rank
    order, stage after stage of tp ranks): each stage's layer counts (:func:`layer_counts`), its layers after the
    stage before's."""
    stages = [step_counts[s:s + tp] for s in range(0, len(step_counts), tp)]
    return torch.cat([layer_counts([torch.tensor(c) for c in ranks], ep) for ranks in stages], dim=1)


def routing_summary(counts: torch.Tensor, ep: int = 1) -> dict:
    """A JSON-ready summary of counts (steps, layers, E): totals per expert and per rank of ``ep`` (E divisible by
    it), both imbalances, and what the rank imbalance would be with the experts whole on ``r`` ranks for every r
    that divides E (at ep = 1 every rank computes a slice of every pair: balanced by construction)."""
    experts = counts.shape[-1]
    if experts % ep:
        raise ValueError(f"{experts} experts do not divide over ep={ep} ranks")
    total = tuple(range(counts.dim() - 1))
    return {"experts": experts, "ep": ep, "pairs": int(counts.sum()),
            "tokens_per_expert": counts.sum(dim=total).tolist(),
            "tokens_per_rank": per_rank(counts, ep).sum(dim=total).tolist(),
            "expert_imbalance": imbalance(counts), "rank_imbalance": imbalance(per_rank(counts, ep)),
            "rank_imbalance_at_ep": {r: imbalance(per_rank(counts, r)) for r in range(2, experts + 1)
                                     if experts % r == 0}}
