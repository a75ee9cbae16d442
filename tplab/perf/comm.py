"""The α-β (latency-bandwidth) cost model of collectives.

Sending one message of S bytes over a link costs α + S/β seconds: α is the
fixed per-message latency, β the link bandwidth in bytes per second.

With n ranks and an S-byte buffer per rank:

* naive all-reduce (everyone sends to rank 0, which sums and sends back):
  rank 0 handles 2(n-1) full messages one after another,
  T = 2(n-1)(α + S/β).
* ring all-reduce (reduce-scatter then all-gather, n-1 steps each, every rank
  sending one S/n chunk per step, all links busy at once):
  T = 2(n-1)(α + S/(nβ)).  For large S this tends to 2S/β, independent of n.
* ring all-gather or reduce-scatter (S = the full buffer): T = (n-1)(α + S/(nβ)).
* all-to-all (pairwise exchange: in each of n-1 steps every rank sends one peer its chunk), S the bytes one rank
  sends to the others in all: T = (n-1)α + S/β.

Pure arithmetic: the cost model of :mod:`tplab.perf.estimate` and the teaching
collectives of :mod:`tplab.comm.collectives` share these formulas.
"""
from __future__ import annotations


def naive_all_reduce_seconds(nbytes: float, n: int, alpha_s: float, beta_bytes_per_s: float) -> float:
    """T = 2(n-1)(α + S/β)."""
    return 2 * (n - 1) * (alpha_s + nbytes / beta_bytes_per_s)


def ring_all_reduce_seconds(nbytes: float, n: int, alpha_s: float, beta_bytes_per_s: float) -> float:
    """T = 2(n-1)(α + S/(nβ))."""
    return 2 * (n - 1) * (alpha_s + nbytes / (n * beta_bytes_per_s))


def ring_all_gather_seconds(nbytes: float, n: int, alpha_s: float, beta_bytes_per_s: float) -> float:
    """T = (n-1)(α + S/(nβ)), S the size of the gathered buffer (also reduce-scatter's input)."""
    return (n - 1) * (alpha_s + nbytes / (n * beta_bytes_per_s))


def all_to_all_seconds(nbytes: float, n: int, alpha_s: float, beta_bytes_per_s: float) -> float:
    """T = (n-1)α + S/β, S the bytes one rank sends to the n-1 others."""
    return (n - 1) * alpha_s + nbytes / beta_bytes_per_s


def bus_bandwidth(nbytes: float, seconds: float, n: int, op: str = "all_reduce") -> float:
    """nccl-tests' busbw: algbw = S/t scaled to what each link carries.

    all_reduce: algbw * 2(n-1)/n; all_gather and reduce_scatter: algbw * (n-1)/n.
    """
    factor = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n}[op]
    return nbytes / seconds * factor
