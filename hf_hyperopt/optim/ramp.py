"""The ramp: the weights' learned step size starts at a scale read off the weights themselves.

``ramp=tau`` on level 1 (see :class:`~hf_hyperopt.optim.config.LevelConfig`). The first step is a probe
at ``RAMP_PROBE * lr``; from the probe's increment (the lr's tangent: the update is linear in the step
size) the *target* factor on the learned lr is set where one step moves the weights by ``tau`` of
their norm, the relative step size that Adafactor and LARS-style trust ratios use. A larger initial lr
starts at the target at once, so a too-large lr never takes a step; a smaller one doubles every step
until it gets there, a geometric warm-up of ``log2(target)`` steps. The level above leaves the lr
alone until the target is reached and learns it from there, so the initial lr decides how the tower
reaches its start, not where it starts.

The approach does not wait for the hypergradient: on a plateau (a fresh head on a pretrained encoder)
its one-step sign is mostly noise and would stop a search anywhere. A step of ``tau`` of the weights'
norm is the start taken from above too, so it is no riskier from below.

Weights that are all zero have no scale: the ramp then keeps the initial lr.

State: :class:`RampState`, held in the tower state (:class:`~hf_hyperopt.optim.state.TowerState`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Growth per step on the way up from a small initial lr: a thousandfold in ten steps.
RAMP_GROWTH = 2.0
# The probe step, as a fraction of lr: it only measures how far one step moves the weights.
RAMP_PROBE = 1e-6


def validate_ramp(at: str, ramp: float, *, placed: bool = False) -> None:
    """Raise ``ValueError`` unless ``ramp`` is in ``[0, 1)`` and, for a level ``placed`` other than level 1, zero.

    ``at`` names the level in the message (``level 2 (adam)``).
    """
    if not (isinstance(ramp, (int, float)) and math.isfinite(ramp) and 0.0 <= ramp < 1.0):
        raise ValueError(f"{at}: ramp={ramp!r} is outside [0, 1)")
    if placed and ramp:
        raise ValueError(
            f"{at}: ramp={ramp!r} applies to the weights' learned lr, so it belongs to level 1 (the level that learns it)"
        )


@dataclass
class RampState:
    """Where the ramp stands: ``factor`` on the learned lr and the ``target`` it approaches (1-element
    tensors), whether the probe has ``sized`` the target (host bool) and whether the approach is still
    ``active`` (a 1-element bool tensor, so that the approach needs no device read)."""

    factor: Tensor
    target: Tensor
    sized: bool
    active: Tensor

    @classmethod
    def start(cls, dtype: torch.dtype, device: torch.device) -> RampState:
        """The ramp before the probe step: the factor at the probe's, the target at the initial lr."""
        return cls(
            factor=torch.tensor([RAMP_PROBE], dtype=dtype, device=device),
            target=torch.ones(1, dtype=dtype, device=device),
            sized=False,
            active=torch.ones(1, dtype=torch.bool, device=device),
        )


def size_ramp(ramp: RampState, tau: float, weights_sq: Tensor, probe_sq: Tensor) -> None:
    """After the probe: the target factor, at which one step moves the weights by ``tau`` of their norm.

    ``weights_sq`` and ``probe_sq`` are the squared norms of the weights and of the probe's increment,
    summed over every rank. Read on the host once, to know that the target is set; a probe that moved
    nothing (no gradient yet) is taken again.
    """
    if not bool(probe_sq > 0):
        return
    factor, target = ramp.factor, ramp.target
    if bool(weights_sq > 0):
        sized = tau * (weights_sq / probe_sq).sqrt() * factor.double()
        info = torch.finfo(factor.dtype)
        target.copy_(sized.clamp(min=info.tiny, max=info.max).to(factor.dtype))
    else:  # no scale to read: keep the initial lr
        target.fill_(1.0)
    factor.copy_(torch.minimum(target, torch.ones_like(target)))
    ramp.sized = True
    ramp.active &= factor < target  # started at the target: nothing to approach


def advance_ramp(ramp: RampState, device: torch.device) -> Tensor:
    """One step of the approach; elementwise, no device read.

    Returns whether the approach was on at this step (the level above leaves the lr alone then).
    """
    if not ramp.sized:  # the probe step: nothing to decide yet
        return torch.zeros(1, dtype=torch.bool, device=device)
    factor, target, active = ramp.factor, ramp.target, ramp.active
    factor.copy_(torch.where(active, torch.minimum(factor * RAMP_GROWTH, target), factor))
    approaching = active.clone()  # the step that reaches the target is the approach's too
    active &= factor < target
    return approaching
