"""The ramp: a search for the scale of the weights' learned step size before the level above learns it.

``ramp=tau`` on level 1 (see :class:`~hf_hyperopt.optim.engine.LevelConfig`). The first step is a probe
at ``RAMP_PROBE * lr``; from the probe's increment (the lr's tangent: the update is linear in the
step size) the factor on the learned lr is set where one step moves the weights by ``tau`` of their
norm, at most 1. While the lr's hypergradient asks for a larger step, the factor doubles, up to 1 (the
initial lr); at the first step that does not, it steps back by ``sqrt(RAMP_GROWTH)`` (between the last
size that helped and the first that did not) and the search ends, as it does on reaching 1. The level
above leaves the lr alone for the whole search. The search never goes above the initial lr: the
one-step hypergradient of a model trained from scratch keeps asking for more well past the best step
size, so an open-ended search would overshoot there.

State, in the tower state: ``ramp`` (the factor, a 1-element tensor), ``ramp_sized`` (host bool) and
``ramp_active`` (a 1-element bool tensor, so that the search needs no device read).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Growth per agreeing step: a thousandfold in ten such steps.
RAMP_GROWTH = 2.0
# The probe step, as a fraction of lr: it only measures how far one step moves the weights.
RAMP_PROBE = 1e-6


def validate_ramp(level: int, name: str, ramp: float, *, placed: bool = True) -> None:
    """Raise ``ValueError`` unless ``ramp`` is in ``[0, 1)`` and, where the level's place is known, non-zero only on level 1."""
    if not (isinstance(ramp, (int, float)) and math.isfinite(ramp) and 0.0 <= ramp < 1.0):
        raise ValueError(f"level {level} ({name}): ramp={ramp!r} is outside [0, 1)")
    if placed and ramp and level != 1:
        raise ValueError(
            f"level {level} ({name}): ramp={ramp!r} applies to the weights' learned lr, so it belongs "
            "to level 1 (the level that learns it)"
        )


def init_ramp(ts: dict, dtype: torch.dtype, device: torch.device) -> None:
    ts["ramp"] = torch.tensor([RAMP_PROBE], dtype=dtype, device=device)
    ts["ramp_sized"] = False
    ts["ramp_active"] = torch.ones(1, dtype=torch.bool, device=device)


def size_ramp(ts: dict, tau: float, weights_sq: Tensor, probe_sq: Tensor) -> None:
    """After the probe: the factor at which one step moves the weights by ``tau`` of their norm (at most 1).

    ``weights_sq`` and ``probe_sq`` are the squared norms of the weights and of the probe's increment,
    summed over every rank. Read on the host once, to know that the factor is set; a probe that moved
    nothing (no gradient yet) is taken again.
    """
    if not bool(probe_sq > 0):
        return
    ramp = ts["ramp"]
    sized = tau * (weights_sq / probe_sq).sqrt() * ramp.double()
    ramp.copy_(sized.clamp(max=1.0, min=torch.finfo(ramp.dtype).tiny).to(ramp.dtype))
    ts["ramp_sized"] = True
    ts["ramp_active"] &= ramp < 1.0  # a start at the initial lr has nothing to search


def advance_ramp(ts: dict, h_lr: Tensor) -> Tensor:
    """One step of the search, given the lr's hypergradient (summed over units); elementwise, no device read.

    Returns whether the search was on at this step (the level above leaves the lr alone then).
    """
    if not ts["ramp_sized"]:  # the probe step: nothing to decide yet
        return torch.zeros(1, dtype=torch.bool, device=h_lr.device)
    ramp, active = ts["ramp"], ts["ramp_active"]
    more = torch.isfinite(h_lr) & (h_lr < 0)
    grow, stop = active & more, active & ~more
    back = ramp / math.sqrt(RAMP_GROWTH)
    ramp.copy_(torch.where(grow, (ramp * RAMP_GROWTH).clamp_max(1.0), torch.where(stop, back, ramp)))
    searching = active.clone()  # the step that ends the search is the search's too
    active &= more & (ramp < 1.0)
    return searching
