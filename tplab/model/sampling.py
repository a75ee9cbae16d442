"""Choosing the next token: greedy, or temperature / top-k / top-p sampling with a seed.

Sampling needs the whole distribution, so the TP model first all-gathers the
logits (greedy does not: see :meth:`tplab.layers.vocab.ParallelLMHead.greedy`).
After the all-gather every rank holds bit-identical logits, and every rank
draws from its own ``torch.Generator`` seeded with the same seed and advanced
in the same way. So every rank picks the same token with no extra broadcast:
the draw is replicated, not communicated. (The alternative, sampling on rank 0
and broadcasting the ids, costs one more collective per step.)

The draw is an inverse-CDF lookup with one uniform u per row, taken from a CPU
generator: token = the first t with CDF(t) > u * CDF(V-1). It depends only on
the seed and the probabilities, not on the device or on tp. Logits at
different tp degrees differ by float rounding (~1e-6), so seeded samples are
the same tokens at every tp unless a u falls within that rounding of a CDF
step.

Order of the filters (as in HF transformers): divide by the temperature, keep
the top-k logits (ties with the k-th are kept), then keep the smallest set of
most likely tokens whose probability mass reaches top_p.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tplab.checks import is_positive_int


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. top_k 0 or None: no top-k. top_p 1.0: no nucleus filter."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and not is_positive_int(self.top_k, 0):
            raise ValueError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_positive_int(self.seed, 0) or self.seed >= 2 ** 63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with ``seed``: create one per generation, identically on every rank."""
        return torch.Generator().manual_seed(self.seed)


def filtered_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities (batch, V) in float64 after temperature, top-k and top-p: filtered tokens get 0, the rest sum to 1."""
    if params.greedy:
        raise ValueError("temperature 0 is greedy: take the argmax instead of sampling")
    scores = logits.double() / params.temperature
    if params.top_k:
        kth = scores.topk(min(params.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p  # the first token always stays (mass_before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """One token id per row of ``logits`` (batch, V), drawn by inverse CDF with uniforms from ``generator``."""
    probs = filtered_probabilities(logits, params)
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64).to(cdf.device)
    return torch.searchsorted(cdf, u * cdf[..., -1:], right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)
