"""Fit the cost model's efficiencies to published measurements, and say how well it predicts unseen ones.

The fit minimises Σ_i (log(predicted_i / published_i))², the squared log
error of every figure of :mod:`tplab.bench.published`, over the parameters in
``FITTED`` (Levenberg-Marquardt with a forward-difference Jacobian, on the
logit of a fraction or the log of a time, so fractions stay in (0, 1) and
times positive). Deterministic: the same figures and start give the same
parameters, which is what the test of the committed values relies on.

:func:`cross_validate` leaves one group out at a time (a source and model,
:func:`tplab.bench.published.source_key`), fits the rest, and predicts the
group left out: those are the errors a new model on the same engines gets.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Callable

import numpy as np

from tplab.bench.published import predict, source_key
from tplab.specs.efficiency import Efficiency

FITTED = ("memory_bandwidth", "compute", "compute_fp8", "gemm_half_tokens", "layer_overhead_us", "step_overhead_us",
          "served_step_overhead_us", "served_request_overhead_us", "sequence_overhead_us", "collective_base_us")
FRACTIONS = ("memory_bandwidth", "compute", "compute_fp8")
# where every fit starts, so that a fit depends on the figures only, not on the efficiency.json it replaces
START = {"memory_bandwidth": 0.8, "compute": 0.6, "compute_fp8": 0.6, "gemm_half_tokens": 64.0, "layer_overhead_us": 20.0,
         "step_overhead_us": 200.0, "served_step_overhead_us": 1000.0, "served_request_overhead_us": 1000.0,
         "sequence_overhead_us": 1.0,
         "collective_base_us": 5.0}
FLOOR = 1e-3  # a time parameter never goes below this (µs or tokens): keeps its log finite


def _to_vector(eff: Efficiency) -> np.ndarray:
    values = []
    for name in FITTED:
        v = getattr(eff, name)
        values.append(math.log(v / (1 - v)) if name in FRACTIONS else math.log(max(v, FLOOR)))
    return np.array(values)


def _from_vector(x: np.ndarray, base: Efficiency) -> Efficiency:
    x = np.clip(x, -30.0, 30.0)
    values = {name: (1 / (1 + math.exp(-v)) if name in FRACTIONS else math.exp(v)) for name, v in zip(FITTED, x)}
    return dataclasses.replace(base, **values)


def log_errors(figures: list[dict], eff: Efficiency) -> np.ndarray:
    """log(predicted / published) of every figure."""
    return np.array([math.log(predict(f, eff) / f["value"]) for f in figures])


def _levenberg_marquardt(residual: Callable[[np.ndarray], np.ndarray], x: np.ndarray, iterations: int = 60
                         ) -> np.ndarray:
    r = residual(x)
    cost, damping = float(r @ r), 1e-3
    for _ in range(iterations):
        step_h = 1e-5
        jacobian = np.stack([(residual(x + step_h * e) - r) / step_h for e in np.eye(len(x))], axis=1)
        normal, gradient = jacobian.T @ jacobian, jacobian.T @ r
        while True:
            step = np.linalg.solve(normal + damping * np.diag(np.diag(normal) + 1e-12), -gradient)
            r_new = residual(x + step)
            new_cost = float(r_new @ r_new)
            if new_cost < cost:
                improved = cost - new_cost
                x, r, cost, damping = x + step, r_new, new_cost, damping / 3
                break
            damping *= 4
            if damping > 1e10:
                return x
        if improved < 1e-10 * max(cost, 1e-12):
            break
    return x


def fit(figures: list[dict], base: Efficiency) -> Efficiency:
    """The efficiencies (``FITTED``, from ``START``; the rest as in ``base``) that minimise the squared log error."""
    start = dataclasses.replace(base, **START)
    x = _levenberg_marquardt(lambda v: log_errors(figures, _from_vector(v, start)), _to_vector(start))
    return _from_vector(x, start)


def cross_validate(figures: list[dict], base: Efficiency) -> list[tuple[dict, float]]:
    """(figure, predicted) for every figure, each predicted by a fit that never saw its group."""
    out = []
    for group in sorted({source_key(f) for f in figures}):
        trained = fit([f for f in figures if source_key(f) != group], base)
        out += [(f, predict(f, trained)) for f in figures if source_key(f) == group]
    return out


def error_table(pairs: list[tuple[dict, float]], by: tuple[str, ...] = ("metric",)) -> dict[tuple, dict]:
    """{key: {"n", "median", "max"}} of |predicted / published - 1| grouped by the figure fields ``by``."""
    groups: dict[tuple, list[float]] = {}
    for figure, predicted in pairs:
        groups.setdefault(tuple(figure[k] for k in by), []).append(abs(predicted / figure["value"] - 1))
    return {k: {"n": len(v), "median": statistics.median(v), "max": max(v)} for k, v in sorted(groups.items())}
