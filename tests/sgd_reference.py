"""A tower on SGD weights against a written-out ``torch.optim.SGD`` whose lr the test computes by hand.

Shared by the tests of the ramp (tests/test_tower_trace.py) and of its search
(tests/test_tower_ramp_search.py), whose references differ only in how they move the lr.
"""

from __future__ import annotations

import math

import pytest
import torch


def grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def dot(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    """<xs, ys> over lists of tensors, as one Python float."""
    return sum(float((a * b).sum()) for a, b in zip(xs, ys, strict=True))


def step_both(
    opt, model, ref, plain, log_lr: float, factor: float, target: float | None, tau: float
) -> tuple[list[torch.Tensor], float, float]:
    """One step of the tower and of the reference at ``exp(log_lr) * factor`` (gradients already in both).

    The weights and the tower's next lr are compared. On the ramp's probe step (``target`` None) the
    target is set, the factor at which one step moves the weights by ``tau`` of their norm, and the
    factor becomes it or 1, whichever is smaller. Returns the reference's update ``-lr * g`` (the
    tangent in log(lr) of that step), the factor and the target.
    """
    lr = math.exp(log_lr) * factor
    g = grads(plain)
    for group in ref.param_groups:
        group["lr"] = lr
    update = [-lr * t for t in g]
    weights = [p.detach().clone() for p in plain.parameters()] if target is None else None  # before the probe
    ref.step()
    opt.step()
    opt.zero_grad()
    ref.zero_grad()
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    if target is None:
        target = tau * math.sqrt(dot(weights, weights)) / math.sqrt(dot(update, update)) * factor
        factor = min(1.0, target)
    assert opt.hyperparameters()[0]["lr"] == pytest.approx(math.exp(log_lr) * factor, rel=1e-10)
    return update, factor, target
