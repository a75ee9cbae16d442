"""The rounding bound: gamma_n, and that every summation order of a linear layer lies within it."""
from __future__ import annotations

import pytest
import torch

from tplab.layers.rounding import gamma, gelu_input_error, in_rounding_units, linear_bound


def test_gamma_is_n_u_over_one_minus_n_u():
    u = 2.0 ** -24
    assert gamma(65) == pytest.approx(65 * u / (1 - 65 * u), rel=1e-15)
    assert gamma(3, torch.bfloat16) == pytest.approx(3 * 2 ** -8 / (1 - 3 * 2 ** -8))
    with pytest.raises(ValueError, match="undefined"):
        gamma(300, torch.bfloat16)


@pytest.mark.parametrize("parts", [1, 2, 4, 16])
def test_any_grouping_of_the_sum_is_within_the_bound_of_the_dense_product(parts):
    torch.manual_seed(parts)
    x, w, b = torch.randn(7, 64), torch.randn(32, 64), torch.randn(32)
    dense = torch.nn.functional.linear(x, w, b)
    grouped = sum(torch.nn.functional.linear(xp, wp) for xp, wp in zip(x.chunk(parts, -1), w.chunk(parts, -1))) + b
    exact = x.double() @ w.double().T + b.double()
    bound = linear_bound(x, w, b)
    assert ((grouped - dense).abs() <= bound).all()
    assert ((dense.double() - exact).abs() <= bound / 2).all()  # each result within gamma_{k+1} S of the exact
    assert in_rounding_units(grouped - dense, x, w, b) < 65  # the bound is 2 gamma_65 S ≈ 65 eps S


def test_a_bound_grows_with_an_input_error_and_through_gelu():
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    e = torch.full_like(x, 1e-3)
    assert torch.allclose(linear_bound(x, w, input_error=e) - linear_bound(x, w), e.double() @ w.double().abs().T)
    assert (gelu_input_error(x, e) >= 1.13 * e.double()).all()
