"""Sharding arithmetic: which slice of a full tensor rank r owns.

Pure functions (no communication, no torch.distributed), so notebooks can call
and draw them. The convention throughout tplab: a dimension of size D split
over tp ranks gives rank r the contiguous block [r*D/tp, (r+1)*D/tp).
"""
from __future__ import annotations

import math

from tplab.checks import check_int


def divisors(n: int) -> list[int]:
    """All positive divisors of n, ascending: the tp degrees that split n evenly (sqrt(n) steps, so an absurd n
    is answered at once)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def check_tp(tp: int) -> None:
    """Reject a tp that is not a positive integer."""
    check_int("tp", tp)


def check_divisible(name: str, size: int, tp: int) -> None:
    """Raise a ValueError naming the dimension and the valid tp values when tp does not divide size."""
    check_tp(tp)
    if size % tp:
        valid = ", ".join(str(d) for d in divisors(size))
        raise ValueError(f"{name}={size} is not divisible by tp={tp}; valid tp: {valid}")


def shard_range(size: int, tp: int, rank: int, name: str = "dim") -> tuple[int, int]:
    """(start, stop) of rank's block when ``size`` is split evenly over ``tp`` ranks."""
    check_divisible(name, size, tp)
    if not 0 <= rank < tp:
        raise ValueError(f"rank={rank} is outside 0..{tp - 1}")
    block = size // tp
    return rank * block, (rank + 1) * block


# --- vocabulary: padded so every rank owns the same number of rows ------------
def padded_size(size: int, tp: int) -> int:
    """The smallest multiple of tp that is >= size: V' = ceil(V / tp) * tp."""
    check_tp(tp)
    return -(-size // tp) * tp


def vocab_shard(vocab_size: int, tp: int, rank: int) -> tuple[int, int, int]:
    """(start, stop, real_stop) of rank's rows of the padded vocabulary V'.

    Rank r owns token ids [r*V'/tp, (r+1)*V'/tp). Only [start, real_stop) are
    real tokens (real_stop = min(stop, V)); the rest are padding rows, which
    hold zeros and never win an argmax. real_stop may equal start: a rank can
    own padding only.
    """
    start, stop = shard_range(padded_size(vocab_size, tp), tp, rank, "padded vocab")
    return start, stop, max(start, min(stop, vocab_size))


# --- grouped-query attention: which heads rank r holds -------------------------
def valid_gqa_tp(num_heads: int, num_kv_heads: int) -> list[int]:
    """The tp degrees that split attention: tp | num_heads, and tp | num_kv_heads or num_kv_heads | tp."""
    return [t for t in divisors(num_heads) if gqa_tp_problem(num_heads, num_kv_heads, t) is None]


def gqa_tp_problem(num_heads: int, num_kv_heads: int, tp: int) -> str | None:
    """Why tp cannot split these attention heads, or None when it can."""
    check_tp(tp)
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        return f"num_attention_heads={num_heads} must be a multiple of num_key_value_heads={num_kv_heads}"
    if num_heads % tp:
        return f"num_attention_heads={num_heads} is not divisible by tp={tp}"
    if tp <= num_kv_heads and num_kv_heads % tp:
        return f"num_key_value_heads={num_kv_heads} is not divisible by tp={tp}"
    if tp > num_kv_heads and tp % num_kv_heads:
        return (f"tp={tp} > num_key_value_heads={num_kv_heads} must be a multiple of {num_kv_heads} "
                f"(each KV head replicated on tp/{num_kv_heads} ranks)")
    return None


def check_gqa_tp(num_heads: int, num_kv_heads: int, tp: int) -> None:
    """Raise a ValueError naming the constraint and the valid tp values when tp cannot split the heads."""
    problem = gqa_tp_problem(num_heads, num_kv_heads, tp)
    if problem:
        valid = ", ".join(str(t) for t in valid_gqa_tp(num_heads, num_kv_heads))
        raise ValueError(f"{problem}; valid tp: {valid}")


def kv_replicas(num_kv_heads: int, tp: int) -> int:
    """How many ranks hold a copy of each KV head: 1 when tp <= num_kv_heads, else tp / num_kv_heads."""
    return max(1, tp // num_kv_heads)


def gqa_heads(num_heads: int, num_kv_heads: int, tp: int, rank: int) -> tuple[range, range]:
    """(q_heads, kv_heads): the query heads and the KV heads rank r holds.

    Query head h reads KV head h // g, with g = num_heads / num_kv_heads.
    Rank r holds query heads [r*H/tp, (r+1)*H/tp). When tp <= num_kv_heads it
    holds KV heads [r*KV/tp, (r+1)*KV/tp), exactly those its query heads read.
    When tp > num_kv_heads it holds the single KV head r // (tp/KV): that head
    is replicated on tp/KV consecutive ranks (as vLLM does), because its g
    query heads are spread over those ranks.
    """
    check_gqa_tp(num_heads, num_kv_heads, tp)
    q0, q1 = shard_range(num_heads, tp, rank, "num_attention_heads")
    if tp <= num_kv_heads:
        k0, k1 = shard_range(num_kv_heads, tp, rank, "num_key_value_heads")
        return range(q0, q1), range(k0, k1)
    kv = rank // kv_replicas(num_kv_heads, tp)
    return range(q0, q1), range(kv, kv + 1)


# --- pipeline stages: contiguous ranges of decoder layers --------------------
def stage_layers(num_layers: int, pp: int, counts: list[int] | None = None) -> list[range]:
    """The decoder layers of each of ``pp`` stages: contiguous ranges that cover [0, num_layers) in order.

    ``counts``: layers per stage, as given (``--pp-layers 10,12,...``); they must be positive and sum to
    ``num_layers``. Default, the even split: every stage gets floor(L/pp) layers, and the L mod pp layers left
    over go one each to the stages just before the last, as vLLM splits them: the last stage also runs the final
    norm and the LM head, and the first the embedding, which is cheaper. L = 5, pp = 2 gives [0, 3), [3, 5);
    L = 10, pp = 4 gives 2, 3, 3, 2.
    """
    check_int("pp", pp)
    if pp > num_layers:
        raise ValueError(f"pp={pp} is more than the model's {num_layers} decoder layers: each stage needs at least "
                         f"one; valid pp: 1 to {num_layers}")
    if counts is None:
        counts = [num_layers // pp] * pp
        for s in range(num_layers % pp):
            counts[-2 - s] += 1
    elif len(counts) != pp or sum(counts) != num_layers or not all(isinstance(c, int) and c >= 1 for c in counts):
        raise ValueError(f"layers per stage {','.join(map(str, counts))} must be {pp} positive counts (one per "
                         f"stage) that sum to the model's {num_layers} layers, e.g. "
                         f"{','.join(str(len(r)) for r in stage_layers(num_layers, pp))}")
    starts = [sum(counts[:s]) for s in range(pp)]
    return [range(start, start + n) for start, n in zip(starts, counts)]


EXPERT_DISPATCH = ("all-reduce", "all-to-all")  # how tokens reach experts placed whole (tplab.model.moe)


def check_dispatch(dispatch: str, tp: int, ep: int) -> None:
    """ValueError unless ``dispatch`` is one of :data:`EXPERT_DISPATCH` and, for "all-to-all", the experts are whole
    on every rank (ep = tp)."""
    if dispatch not in EXPERT_DISPATCH:
        raise ValueError(f"unknown expert dispatch {dispatch!r}; one of {', '.join(EXPERT_DISPATCH)}")
    if dispatch == "all-to-all" and ep != tp:
        raise ValueError(f"the all-to-all dispatch sends tokens to whole experts: it needs ep = tp, got ep={ep} "
                         f"with tp={tp}")
