"""A step that raises leaves the tower's learned hyperparameters as they were.

The levels above the weights step first and the weights last, so an error raised during a step (a
bad gradient layout, running out of memory, ``KeyboardInterrupt``) would otherwise leave the learned
values and the upper levels' state one step ahead of weights that never moved, and the step counters
(Adam's bias correction) off by one. The tower's own state is a handful of vectors with one entry per
learned value, so it is copied before each step and put back if the step raises: a few tiny copies
per step, nothing the size of the model.

What cannot be put back cheaply: the weight level's update runs in place over the parameters and
their state, as in ``torch.optim``; an error in the middle of it leaves them partly updated. The
per-parameter tangents may be consumed (multiplied by the gradients) when the hypergradient is formed, so
after a failed step they are zeroed (a tangent the rule holds in its state, by zeroing its constants): the
next step's hypergradient is then zero, as after a step in which the parameters did not move, and the
learned values do not move on a half-formed one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def rollback_on_error(opt: Any) -> Iterator[None]:
    """Run one step of ``opt`` (a ``TowerOptimizer``); if it raises, restore the tower state and re-raise."""
    ts = opt._tower_state
    theta = [t.clone() for t in ts.theta]
    upper_state = [{n: v.clone() for n, v in d.items()} for d in ts.upper_state]
    # Tangent entries are replaced by new tensors, never written in place: keeping the references suffices.
    upper_tangent = [dict(d) for d in ts.upper_tangent]
    # The step counts are replaced by new lists, never changed in place.
    weight_steps, level_steps = ts.weight_steps, ts.level_steps
    skipped = ts.skipped.clone()
    ramp = (
        None
        if ts.ramp is None
        else dataclasses.replace(
            ts.ramp,
            factor=ts.ramp.factor.clone(),
            target=ts.ramp.target.clone(),
            active=ts.ramp.active.clone(),
            search=None if ts.ramp.search is None else ts.ramp.search.clone(),
        )
    )
    try:
        yield
    except BaseException:
        for t, old in zip(ts.theta, theta, strict=True):
            t.copy_(old)
        for d, old in zip(ts.upper_state, upper_state, strict=True):
            for name, v in d.items():
                v.copy_(old[name])
        ts.upper_tangent[:] = upper_tangent
        ts.weight_steps, ts.level_steps = weight_steps, level_steps
        ts.skipped.copy_(skipped)
        if ramp is not None:
            ts.ramp.factor.copy_(ramp.factor)
            ts.ramp.target.copy_(ramp.target)
            ts.ramp.active.copy_(ramp.active)
            if ramp.search is not None:
                ts.ramp.search.copy_(ramp.search)
            ts.ramp.searching = ramp.searching
            ts.ramp.sized = ramp.sized
        for bucket in opt._buckets or []:
            for flat in bucket.flat.values():
                flat.zero_()
            for scales in bucket.scales.values():  # a held tangent is cleared by its constants
                scales.zero_()
        raise
