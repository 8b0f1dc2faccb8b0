"""A problem whose best constant learning rate is known exactly: the default tower must find it.

SGD on a noisy quadratic ``f(x) = sum_i a_i x_i^2 / 2`` with gradient noise ``sigma``: for a constant
step size ``eta`` the expected loss after ``T`` steps has a closed form, so the best constant ``eta*``
is computed, not estimated. The tower starts far below (1e-6) and far above (1.0, where plain SGD
diverges: ``eta * max(a) = 10 > 2``) and must end within 2x of ``eta*``.
"""

from __future__ import annotations

import math

import pytest
import torch

import hf_hyperopt as hh

D, T, SIGMA = 50, 300, 0.01
CURVATURES = torch.logspace(-2, 1, D, dtype=torch.float64)


def expected_loss(eta: float) -> float:
    """E f(x_T) for SGD with constant ``eta`` from x_0 = 1: each coordinate contracts by (1 - eta a)^2 a
    step and gains eta^2 sigma^2 of noise."""
    r = (1 - eta * CURVATURES) ** 2
    noise = torch.where((r - 1).abs() > 1e-12, (1 - r**T) / (1 - r), torch.full_like(r, float(T)))
    return float(0.5 * (CURVATURES * (r**T + eta**2 * SIGMA**2 * noise)).sum())


def best_constant_lr() -> float:
    etas = torch.logspace(-4, 0.5, 4000, dtype=torch.float64).tolist()
    return min(etas, key=expected_loss)


def test_closed_form_matches_simulation():
    """The closed form is the mean of simulated runs (so eta* is the right target)."""
    eta = 0.1
    g = torch.Generator().manual_seed(0)
    x = torch.ones(2000, D, dtype=torch.float64)
    for _ in range(T):
        x -= eta * (CURVATURES * x + SIGMA * torch.randn(x.shape, generator=g, dtype=torch.float64))
    simulated = float((0.5 * CURVATURES * x**2).sum(1).mean())
    assert simulated == pytest.approx(expected_loss(eta), rel=0.05)


@pytest.mark.xfail(
    strict=True,
    reason="issue 10 target not met: the default's learned lr ends about 0.2x of the best constant from both "
    "starts. Its ramp starts SGD where a step moves x by 0.1% of its norm (about 1/600 of the best lr here); "
    "the level above climbs log(lr) at up to 0.05 a step for about 120 steps, then ever more slowly: the slope "
    "it learns from shrinks with the gradient as x converges, against the memory of its second moment; "
    "see results/README.md",
)
@pytest.mark.parametrize("lr0", [1e-6, 1.0])
def test_default_tower_ends_within_2x_of_the_best_constant_lr(lr0):
    best = best_constant_lr()
    assert 0.05 < best < 0.5  # the problem is what it says: the start is far from it on both sides
    g = torch.Generator().manual_seed(0)
    x = torch.ones(D, dtype=torch.float64, requires_grad=True)
    opt = hh.HyperSGD([x], lr=lr0)
    for _ in range(T):
        x.grad = CURVATURES * x.detach() + SIGMA * torch.randn(D, generator=g, dtype=torch.float64)
        opt.step()
    learned = opt.hyperparameters()[0]["lr"]
    assert math.isfinite(float(x.detach().sum()))
    assert best / 2 <= learned <= 2 * best, f"learned lr {learned:.3g}, best constant {best:.3g}"


@pytest.mark.parametrize("lr0", [1e-6, 1.0])
def test_cosine_half_option_ends_within_2x_of_the_best_constant_lr(lr0):
    """The experimental ``cosine=0.5`` (not the default: on digits its converged lr still drifts up and fails
    after some thousands of epochs, see results/README.md) meets the target from both starts."""
    best = best_constant_lr()
    g = torch.Generator().manual_seed(0)
    x = torch.ones(D, dtype=torch.float64, requires_grad=True)
    opt = hh.HyperSGD([x], lr=lr0, hyper="adam(lr=0.05,ramp=0.001,normalize=true,cosine=0.5)")
    for _ in range(T):
        x.grad = CURVATURES * x.detach() + SIGMA * torch.randn(D, generator=g, dtype=torch.float64)
        opt.step()
    learned = opt.hyperparameters()[0]["lr"]
    assert best / 2 <= learned <= 2 * best, f"learned lr {learned:.3g}, best constant {best:.3g}"
