"""Experimental top levels for the sensitivity sweep (issue 10, "a top level with nothing to tune").

Not part of the library: each is a top level whose step adapts to how consistent the hypergradient it is
given is (``signgain``, ``snrpow``, ``dogtop``), so that the top's own step size would matter less, or
shrinks as the run goes on (``adamsqrt``, ``adagradm``), so that a small bias that keeps its sign moves
the learned lr less over a long run. Importing this module registers them for spec strings
(``signgain(lr=0.05)``, ``adamsqrt(lr=0.05,t0=100)``); only as the top of a tower (they write no
tangents of their own hyperparameters). Results: ``results/README.md``, "The top level's step size" and
"Long runs".
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from hf_hyperopt.levels import RULES
from hf_hyperopt.levels.base import HyperSpec, Rule, Step


class _AdamTop(Rule):
    hyperparameters: ClassVar[dict[str, HyperSpec]] = {
        "lr": HyperSpec(0.05, "step", "initial step size"),
        "beta1": HyperSpec(0.9, "unit", "decay of the first moment"),
        "beta2": HyperSpec(0.999, "unit", "decay of the second moment"),
        "eps": HyperSpec(1e-8, "step", "added to the denominator"),
    }
    state_names = ("exp_avg", "exp_avg_sq", "log_gain")

    def adam_ratio(self, grads, state, hp, step):
        """Adam's bias-corrected ``m / sqrt(v)``, and the first moment before and after this step."""
        (m,), (v,), (g,) = state["exp_avg"], state["exp_avg_sq"], grads
        b1, b2 = float(hp["beta1"][0]), float(hp["beta2"][0])
        before = m.clone()
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        ratio = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + float(hp["eps"][0]))
        return ratio, before, m


class SignGainRule(_AdamTop):
    """Adam whose step grows 5% a step while its first moment keeps its sign and halves when it flips
    (Rprop's rule on the momentum, which flips about one step in seven on pure noise), in 1e-3 .. 1e2
    times ``lr``."""

    name = "signgain"

    def update(self, params, grads, state, work, hp, step, tangents=None):
        ratio, before, m = self.adam_ratio(grads, state, hp, step)
        (log_gain,) = state["log_gain"]
        flipped = (before * m) < 0
        log_gain.add_(torch.where(flipped, math.log(0.5), math.log(1.05)))
        log_gain.clamp_(math.log(1e-3), math.log(1e2))
        return Step([ratio * log_gain.exp()], -hp["lr"])


class SNRPowerRule(_AdamTop):
    """Adam whose step is ``r |r|`` for Adam's ratio ``r``: about 1 when the hypergradient keeps its sign,
    about 0.05 on noise (against 0.23 for ``r``), so a large ``lr`` climbs fast and wanders little."""

    name = "snrpow"

    def update(self, params, grads, state, work, hp, step, tangents=None):
        ratio, _, _ = self.adam_ratio(grads, state, hp, step)
        return Step([ratio * ratio.abs()], -hp["lr"])


class DoGTopRule(Rule):
    """DoG (Ivgi, Hinder, Carmon 2023) on the learned coordinates: the step is the largest distance moved
    from where the level started over the root of the summed squared hypergradients, so it has no step
    size of its own (``lr`` multiplies it, 1 is DoG). The start's distance ``r_eps`` is DoG's
    ``1e-6 (1 + |x_0|)``. The reference point is taken at the first step the level takes (after the
    ramp), not at construction."""

    name = "dogtop"
    hyperparameters: ClassVar[dict[str, HyperSpec]] = {"lr": HyperSpec(1.0, "step", "multiplier on DoG's step")}
    state_names = ("start", "max_distance", "sum_sq", "started")

    def update(self, params, grads, state, work, hp, step, tangents=None):
        (p,), (g,) = params, grads
        (start,), (max_distance,), (sum_sq,), (started,) = (
            state["start"],
            state["max_distance"],
            state["sum_sq"],
            state["started"],
        )
        start.copy_(torch.where(started > 0, start, p))
        started.fill_(1.0)
        r_eps = 1e-6 * (1.0 + start.abs())
        max_distance.copy_(torch.maximum(max_distance, (p - start).abs()).maximum(r_eps))
        sum_sq.addcmul_(g, g)
        return Step([g * max_distance / sum_sq.sqrt().clamp_min(1e-30)], -hp["lr"])


class AdamSqrtRule(_AdamTop):
    """Adam whose step size decays as ``lr * min(1, sqrt(t0 / t))`` after its first ``t0`` steps (an anytime
    online-learning rate): the default's pace at first, ever slower later. ``t`` is the level's step count,
    which includes the steps the ramp holds it still, so fewer than ``t0`` steps after the ramp are at full
    pace."""

    name = "adamsqrt"
    hyperparameters: ClassVar[dict[str, HyperSpec]] = {
        **_AdamTop.hyperparameters,
        "t0": HyperSpec(36.0, "step", "steps at the full step size"),
    }

    def update(self, params, grads, state, work, hp, step, tangents=None):
        ratio, _, _ = self.adam_ratio(grads, state, hp, step)
        t = float(step)
        decay = min(1.0, math.sqrt(float(hp["t0"][0]) / t))
        return Step([ratio * decay], -hp["lr"])


class AdaGradMomentumRule(Rule):
    """AdaGrad with a first moment: ``m = beta1 m + (1 - beta1) h`` (no bias correction, so the first steps
    are small), ``S = S + h^2``, step ``lr * m / sqrt(S)``: about ``lr (1 - beta1^t) / sqrt(t)`` while the
    hypergradient keeps its sign."""

    name = "adagradm"
    hyperparameters: ClassVar[dict[str, HyperSpec]] = {
        "lr": HyperSpec(0.3, "step", "step size"),
        "beta1": HyperSpec(0.9, "unit", "decay of the first moment"),
    }
    state_names = ("exp_avg", "sum")

    def update(self, params, grads, state, work, hp, step, tangents=None):
        (m,), (s,), (g,) = state["exp_avg"], state["sum"], grads
        m.lerp_(g, 1 - float(hp["beta1"][0]))
        s.addcmul_(g, g)
        return Step([m / s.sqrt().clamp_min(1e-30)], -hp["lr"])


for _rule in (SignGainRule, SNRPowerRule, DoGTopRule, AdamSqrtRule, AdaGradMomentumRule):
    RULES.setdefault(_rule.name, _rule)
