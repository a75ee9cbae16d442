"""A step's time fitted to measured steps: t = a + b·tokens + c·rows + d·attended keys.

A forward pass over a planned batch costs a fixed part a (weights read once,
per-layer launches, collectives' latency), a part per token fed b (the
GEMMs' work and the all-reduces' bytes grow with it), a part per row c
(sampling, per-sequence bookkeeping), and a part per query-key pair d
(attention: a row feeding n tokens after c cached ones attends n·c + n(n+1)/2
pairs). :func:`fit_step_cost` finds a, b, c, d by least squares over the steps
an engine run recorded (:class:`tplab.serving.loop.ServeRun`), in pure Python.
"""
from __future__ import annotations

from dataclasses import dataclass

from tplab.serving.loop import attended_keys

FEATURES = ("fixed", "tokens", "rows", "attended")


@dataclass(frozen=True)
class LinearStepCost:
    """Seconds of a step of rows [(start, count), ...]: ``fixed + per_token·Σcount + per_row·rows + per_key·Σattended``."""

    fixed: float
    per_token: float
    per_row: float
    per_key: float

    def __call__(self, rows: list[tuple[int, int]]) -> float:
        tokens = sum(count for _, count in rows)
        attended = sum(attended_keys(start, count) for start, count in rows)
        return self.fixed + self.per_token * tokens + self.per_row * len(rows) + self.per_key * attended


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """x with a·x = b, by Gaussian elimination with partial pivoting (a is small and square)."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-300:
            raise ValueError("the steps do not vary enough to fit a step cost (every feature must change)")
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


def fit_step_cost(steps: list[dict]) -> LinearStepCost:
    """Least squares of measured ``steps`` (dicts with tokens, rows, attended, seconds), each feature scaled to unit
    size so that the normal equations stay well conditioned; coefficients clipped at 0 (a cost never falls)."""
    x = [[1.0, s["tokens"], s["rows"], s["attended"]] for s in steps]
    y = [s["seconds"] for s in steps]
    scale = [max(abs(row[j]) for row in x) or 1.0 for j in range(4)]
    xs = [[v / scale[j] for j, v in enumerate(row)] for row in x]
    normal = [[sum(r[i] * r[j] for r in xs) for j in range(4)] for i in range(4)]
    rhs = [sum(r[i] * t for r, t in zip(xs, y)) for i in range(4)]
    coef = [max(0.0, c / s) for c, s in zip(_solve(normal, rhs), scale)]
    return LinearStepCost(*coef)
