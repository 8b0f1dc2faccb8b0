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

Weights that are all zero have no scale: the ramp then keeps the initial lr (and does not search past it).

``ramp_search=c`` on level 1 (``0.3`` in ``DEFAULT_HYPER``) extends the ramp past its target. From the
step taken at the target on, the factor keeps doubling every step while the lr's hypergradient asks for
a larger lr by more than noise: ``dL/dlog(lr)`` of the step just taken (summed over the lr's units)
below ``-c |g_{t+1}| |Z_t|``, i.e. the cosine of the next gradient and the last update below ``-c``; at
most ``RAMP_SEARCH_DOUBLINGS`` times. At the first step where it does not (or is not finite), or at the
cap, the search ends for good at half the largest factor accepted (never below the target), and the
level above, which leaves the lr alone while the search is on, learns it from there. A search that ends
at the target at once leaves the run the plain ramp's, step for step.

Why the cosine and the margin: the one-step hypergradient is greedy. On a transformer from scratch its
sign asks for more long past a good lr, but with Adam on the weights the cosine stays small (about 0.1
.. 0.2: Adam's update is near the gradient's sign, whose cosine with a gradient of very uneven entries
is small), so the search ends at once, as on a plateau; where the gradients stay aligned (a quadratic, a
small MLP: 0.6 .. 1) it runs until the step overshoots. Even then the sign still accepted steps past the
noisy quadratic's stability limit, and with one doubling undone the level above overcorrected that lr to
0.4x the best constant one; half the largest accepted is the margin an lr range test keeps.

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
# A probe that moved nothing measurable is retried this much larger, up to this fraction of lr.
RAMP_PROBE_RETRY = 1e3
RAMP_PROBE_LIMIT = 1e-2


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


# The most doublings the search takes past the target: up to 4096x it.
RAMP_SEARCH_DOUBLINGS = 12


def validate_ramp_search(at: str, search: float, ramp: float) -> None:
    """Raise ``ValueError`` unless ``search`` (a cosine) is in ``[0, 1)``, and zero without a ``ramp`` on
    the same level (it extends that ramp)."""
    if isinstance(search, bool) or not (isinstance(search, (int, float)) and math.isfinite(search) and 0 <= search < 1):
        raise ValueError(f"{at}: ramp_search={search!r} is outside [0, 1)")
    if search and not ramp:
        raise ValueError(
            f"{at}: ramp_search={search!r} extends the ramp past its target: give it beside ramp= on level 1 (the "
            "level above the weights)"
        )


@dataclass
class RampState:
    """Where the ramp stands: ``factor`` on the learned lr and the ``target`` it approaches (1-element
    tensors), whether the probe has ``sized`` the target (host bool) and whether the approach is still
    ``active`` (a 1-element bool tensor, so that the approach needs no device read).

    With ``ramp_search``, ``search`` (a 1-element int64 tensor) is where the search stands: ``-1``
    before it begins (at the step taken at the target), ``m > 0`` while it judges the step just taken
    (at most ``m - 1`` more doublings), ``0`` once it has ended; ``None`` without ``ramp_search``.
    ``searching`` (host bool, not saved: read off ``search``) is whether it may still be on, so that
    the norms it judges by are taken only then."""

    factor: Tensor
    target: Tensor
    sized: bool
    active: Tensor
    search: Tensor | None = None
    searching: bool = True

    @classmethod
    def start(cls, dtype: torch.dtype, device: torch.device, search: bool = False) -> RampState:
        """The ramp before the probe step: the factor at the probe's, the target at the initial lr."""
        return cls(
            factor=torch.tensor([RAMP_PROBE], dtype=dtype, device=device),
            target=torch.ones(1, dtype=dtype, device=device),
            sized=False,
            active=torch.ones(1, dtype=torch.bool, device=device),
            search=torch.full((1,), -1, dtype=torch.int64, device=device) if search else None,
        )


def size_ramp(ramp: RampState, tau: float, weights_sq: Tensor, probe_sq: Tensor) -> None:
    """After the probe: the target factor, at which one step moves the weights by ``tau`` of their norm.

    ``weights_sq`` and ``probe_sq`` are the squared norms of the weights and of the probe's increment,
    summed over every rank. Read on the host once, to know that the target is set. A probe that moved
    nothing measurable is taken again, a thousand times larger up to ``RAMP_PROBE_LIMIT``: there was no
    gradient yet, or its increment was below what the weights' dtype holds (float16 weights, an lr far
    below any useful one).
    """
    if not bool(probe_sq > 0):
        ramp.factor.mul_(RAMP_PROBE_RETRY).clamp_(max=RAMP_PROBE_LIMIT)
        return
    factor, target = ramp.factor, ramp.target
    if bool(weights_sq > 0):
        sized = tau * (weights_sq / probe_sq).sqrt() * factor.double()
        info = torch.finfo(factor.dtype)
        target.copy_(sized.clamp(min=info.tiny, max=info.max).to(factor.dtype))
    else:  # no scale to read: keep the initial lr, and search nothing from it
        target.fill_(1.0)
        if ramp.search is not None:
            ramp.search.zero_()
            ramp.searching = False
    factor.copy_(torch.minimum(target, torch.ones_like(target)))
    ramp.sized = True
    ramp.active &= factor < target  # started at the target: nothing to approach


def advance_ramp(ramp: RampState, device: torch.device, larger: Tensor | None = None) -> Tensor:
    """One step of the approach and, with ``ramp_search``, of the search; elementwise, and with no
    device read but one a step (``searching``) while the search may be on.

    ``larger`` (1-element bool) is whether the hypergradient of the step just taken asks for a larger lr
    (see :func:`asks_for_more`). Returns whether the lr is held this step (the level above leaves it alone then).
    """
    if not ramp.sized:  # the probe step: nothing to decide yet
        return torch.zeros(1, dtype=torch.bool, device=device)
    factor, target, active = ramp.factor, ramp.target, ramp.active
    held = active.clone()  # the step that reaches the target is the approach's too
    search = ramp.search is not None and ramp.searching  # else over, or none
    if search:
        state = ramp.search
        judging = state > 0  # the step just taken was at the target or past it
        larger = larger.reshape(1).to(device)
        grow = judging & larger & (state > 1)
        ends = judging & ~grow  # at half the largest factor accepted: this one at the cap, the last one else
        # Held while it grows and as it backs off; a search that ends at the target is the plain ramp's.
        held |= grow | (ends & (factor > target))
        back = torch.where(larger, RAMP_GROWTH, RAMP_GROWTH**2)
        info = torch.finfo(factor.dtype)
        factor.copy_(torch.where(grow, (factor * RAMP_GROWTH).clamp(max=info.max), factor))
        factor.copy_(torch.where(ends, torch.maximum(factor / back, target), factor))
        state.copy_(torch.where(grow, state - 1, torch.where(judging, torch.zeros_like(state), state)))
    factor.copy_(torch.where(active, torch.minimum(factor * RAMP_GROWTH, target), factor))
    active &= factor < target
    if search:  # the step about to be taken is at the target: the search judges it next
        state.copy_(torch.where((state < 0) & ~active, torch.full_like(state, RAMP_SEARCH_DOUBLINGS + 1), state))
        ramp.searching = bool(state != 0)
    return held


def asks_for_more(h_lr: Tensor, grads_sq: Tensor, tangent_sq: Tensor, cosine: float) -> Tensor:
    """Whether the lr's hypergradient asks for a larger lr, by more than noise: the cosine of the next
    gradient and the lr's tangent (the last update), ``h_lr / (|g| |Z|)``, below ``-cosine``.

    Not finite: no (NaN compares false), so a non-finite hypergradient ends the search.
    """
    return h_lr < -cosine * grads_sq.sqrt() * tangent_sq.sqrt()  # roots first: the product could underflow
