"""How far two correct floating-point results of the same linear layer may lie apart.

A linear layer's output element is a sum of k+1 terms, y_j = sum_i x_i W_ji + b_j.
Whatever order a kernel adds them in (one long loop, blocks, a tree, FMA, the p
partial sums of a row-parallel all-reduce), the computed value obeys Higham's
bound for a dot product of n = k+1 terms (Accuracy and Stability of Numerical
Algorithms, 2nd ed., eq. 3.5):

    |fl(y_j) - y_j| <= gamma_n * S_j,   S_j = sum_i |x_i| |W_ji| + |b_j|,
    gamma_n = n u / (1 - n u),          u = eps / 2 (the unit roundoff).

Two such results (the dense layer, and the same layer split over tp ranks or
run by another BLAS kernel) therefore differ by at most 2 gamma_n S_j. That is
the tolerance tplab states where bits depend on the kernel; measured
differences are reported in *units of eps * S_j*, where the bound is about
n = k+1 units. If the inputs already differ by e (an earlier layer's rounding),
the exact outputs differ by at most e |W|^T more.

Only what is exact by construction is compared bitwise: a rank's output against
the same operation on the same slice, a concatenation, a copy.
"""
from __future__ import annotations

import torch

GELU_LIPSCHITZ = 1.13  # max |GELU'(z)| = 1.1289 (at z ≈ 1.4): an input error grows at most this much
ELEMENTWISE_ULPS = 4  # an element-wise function's own rounding, in eps * |z|, assumed for torch's kernels


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Higham's gamma_n = n u / (1 - n u) with u = eps/2 of ``dtype``; the relative error bound of n terms."""
    u = torch.finfo(dtype).eps / 2
    if n * u >= 1:
        raise ValueError(f"gamma_{n} is undefined for {dtype}: n*u = {n * u:.2g} >= 1")
    return n * u / (1 - n * u)


def term_magnitude(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """S = |x| |W|^T + |b|, in float64: the size of the terms each output element sums."""
    s = x.double().abs() @ weight.double().abs().T
    return s + bias.double().abs() if bias is not None else s


def linear_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 input_error: torch.Tensor | None = None) -> torch.Tensor:
    """Element-wise bound on |Y_a - Y_b| for two fp computations of Y = x W^T + b (any summation order).

    2 gamma_{k+1} S, plus ``input_error`` |W|^T when the two inputs differ by at most ``input_error``.
    """
    bound = 2 * gamma(weight.shape[-1] + 1, weight.dtype) * term_magnitude(x, weight, bias)
    if input_error is not None:
        bound = bound + input_error.double() @ weight.double().abs().T
    return bound


def gelu_input_error(z: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """Bound on |GELU(z_a) - GELU(z_b)| when |z_a - z_b| <= error: Lipschitz growth plus both roundings."""
    eps = torch.finfo(z.dtype).eps
    return GELU_LIPSCHITZ * error.double() + 2 * ELEMENTWISE_ULPS * eps * z.double().abs()


def in_rounding_units(difference: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None = None) -> float:
    """max_j |difference_j| / (eps * S_j): a measured difference in units of the terms' rounding."""
    eps = torch.finfo(weight.dtype).eps
    return (difference.double().abs() / (eps * term_magnitude(x, weight, bias))).max().item()
