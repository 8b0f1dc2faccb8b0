"""A problem whose best constant learning rate is known exactly: the default tower must find it.

SGD on a noisy quadratic (``benchmarks/quadratic.py``): for a constant step size ``eta`` the expected
loss after ``T`` steps has a closed form, so the best constant ``eta*`` is computed, not estimated. The
tower starts far below (1e-6) and far above (1.0, where plain SGD diverges: ``eta * max(a) = 10 > 2``)
and must end within 2x of ``eta*``.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.quadratic import CURVATURES, SIGMA, STARTS, D, T, best_constant_lr, expected_loss, train


def test_closed_form_matches_simulation():
    """The closed form is the mean of simulated runs (so eta* is the right target)."""
    eta = 0.1
    g = torch.Generator().manual_seed(0)
    x = torch.ones(2000, D, dtype=torch.float64)
    for _ in range(T):
        x -= eta * (CURVATURES * x + SIGMA * torch.randn(x.shape, generator=g, dtype=torch.float64))
    simulated = float((0.5 * CURVATURES * x**2).sum(1).mean())
    assert simulated == pytest.approx(expected_loss(eta), rel=0.05)


@pytest.mark.parametrize("lr0", STARTS)
def test_default_tower_ends_within_2x_of_the_best_constant_lr(lr0):
    """The ramp starts the lr about 600x below the best here; the default's search (``ramp_search=0.3``)
    doubles it while the gradients stay aligned, then backs off to half the largest lr it accepted."""
    best = best_constant_lr()
    assert 0.05 < best < 0.5  # the problem is what it says: the start is far from it on both sides
    learned, x = train(lr0)
    assert math.isfinite(float(x.sum()))
    assert best / 2 <= learned <= 2 * best, f"learned lr {learned:.3g}, best constant {best:.3g}"


@pytest.mark.parametrize("lr0", STARTS)
def test_cosine_half_option_ends_within_2x_of_the_best_constant_lr(lr0):
    """The experimental ``cosine=0.5`` (not the default: on digits its converged lr still drifts up and fails
    after some thousands of epochs, see results/README.md) meets the target from both starts."""
    best = best_constant_lr()
    learned, _ = train(lr0, "adam(lr=0.05,ramp=0.001,normalize=true,cosine=0.5)")
    assert best / 2 <= learned <= 2 * best, f"learned lr {learned:.3g}, best constant {best:.3g}"
