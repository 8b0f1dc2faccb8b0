"""What a tower is made of before it is bound to parameters: level configs, and the one check of their values.

A level above the weights is a plain, frozen description (:class:`LevelConfig`); an optimizer always
owns parameters. Spec strings (:mod:`.spec`), the optimizers' constructors (:mod:`.optimizers`) and
``HyperTrainingArguments`` all build level configs, and every value and option goes through
:func:`validate_value` and :func:`validate_level_options` (names through ``Rule.check_learn``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..levels.base import Rule
from .ramp import validate_ramp, validate_ramp_search

SCOPES: tuple[str, ...] = ("shared", "group", "tensor")

# trace="auto": the trace spans the run's horizon (TowerOptimizer.set_horizon), this many steps until one is set.
AUTO_TRACE = "auto"
AUTO_TRACE_STEPS = 100


def trace_decay(trace: float | str, horizon: int | None) -> float:
    """The decay a level's ``trace`` option stands for: itself, or for ``"auto"`` ``1 - 1/horizon``
    (``AUTO_TRACE_STEPS`` without a horizon)."""
    if trace != AUTO_TRACE:
        return float(trace)
    return 1.0 - 1.0 / (horizon or AUTO_TRACE_STEPS)


@dataclass(frozen=True)
class LevelConfig:
    """One level of a tower before it is bound to parameters.

    Args:
        rule: the level's rule class (:class:`~hf_hyperopt.levels.AdamRule`, ...).
        values: natural initial values of the hyperparameters given explicitly (others take the
            rule's defaults). Flags (``nesterov``) are 0.0 / 1.0.
        learn: the hyperparameters of this level that the level above learns; ``None`` for the
            default (``lr`` in the default mode, the reference's choice in ``gdtuo`` mode).
        trace: for a level above the weights, the decay ``mu`` of the tangent trace behind the
            hypergradient it learns from: ``Z_t = mu * Z_{t-1} + dw_{t+1}/dtheta_t`` and
            ``h_t = <g_{t+1}, Z_t>`` (MARTHE's first-order horizon). ``0`` is the paper's one-step
            hypergradient; values near 1 sum the signal over about ``1 / (1 - mu)`` steps. ``"auto"``
            (``trace=auto``) sums it over one pass through the training data: ``mu = 1 - 1/n`` for the
            horizon ``n`` that :meth:`~hf_hyperopt.optim.engine.TowerOptimizer.set_horizon` sets (the
            ``Trainer`` integration sets the optimizer steps of an epoch, or of the whole run where that
            is shorter or the data has no length); 100 steps until one is set. A longer trace would
            hold updates made from the next batch's own examples an epoch earlier. ``DEFAULT_HYPER``
            uses ``"auto"``.
        normalize: for a level above the weights, learn from ``h_t / |Z_t|``, the slope of the next
            loss along the last update per unit length, instead of ``h_t``: the tangent grows with the
            learned value (an update is proportional to the step size), so ``h_t`` does too, and an
            adaptive level above would remember the hypergradients of a large step size long after it
            has come down. The slope keeps its size whatever the step size, and still shrinks as the
            gradients do when training converges.
        ramp: for the level above the weights, where the weights' learned ``lr`` starts: after a
            probe step at a millionth of ``lr``, at the step size that changes the weights by
            ``ramp`` of their norm, at once from a larger ``lr`` and doubling every step from a
            smaller one; the level above learns the lr from there (:mod:`.ramp`). ``0`` (no ramp) is
            the paper's start at ``lr``. A too-large ``lr`` then never wrecks pretrained weights, and
            a too-small one costs a few steps, not hundreds.
        ramp_search: with ``ramp``, on the level above the weights: after the ramp's target, keep
            doubling the lr every step while its hypergradient asks for a larger one by more than
            noise (the cosine of the next gradient and the last update below ``-ramp_search``), at most
            12 times; at the first step where it does not, or at the cap, go back to half the largest
            lr it accepted and learn from there (:mod:`.ramp`). ``0`` (a level's default) ends the ramp
            at its target; ``DEFAULT_HYPER`` searches with ``0.3``.
        cosine: for the level above the weights (experimental), divide the hypergradient it learns
            from by ``|g_{t+1}|^cosine`` as well: with ``normalize``, ``1`` is the cosine of the next
            gradient and the last update (scale-free, so it does not shrink as training converges: a
            converged run's lr then rises without bound) and ``0`` (the default) the slope; values in
            between shrink the signal as ``|g|^(1 - cosine)``, a weaker brake than the slope's.
        timescale: for a level above the weights, shrink its step size as the run goes on: at the level's
            ``t``-th step (the ramp's steps count) it steps with ``lr * min(1, sqrt(timescale / t))``, T5's
            inverse-square-root schedule; ``hyperparameters()`` and the logs give ``lr`` as written (or
            learned), without the factor. A level with a constant step size moves what it learns by up
            to that step on every step a small bias of the hypergradient keeps its sign, so over a long
            run the bias adds up linearly; with the schedule it adds up as ``sqrt(t)``, at full pace
            while ``t <= timescale``. ``0`` (a level's default) keeps the step constant;
            ``DEFAULT_HYPER`` uses ``100``.
    """

    rule: type[Rule]
    values: dict[str, float] = field(default_factory=dict)
    learn: tuple[str, ...] | None = None
    trace: float | str = 0.0
    ramp: float = 0.0
    normalize: bool = False
    cosine: float = 0.0
    ramp_search: float = 0.0
    timescale: float = 0.0

    def full_values(self) -> dict[str, float]:
        return {name: float(self.values.get(name, spec.default)) for name, spec in self.rule.hyperparameters.items()}

    def to_spec(self) -> str:
        """This level in spec-string form, e.g. ``adam(lr=0.001,beta1=0.8,learn=lr+beta1)``."""
        parts = [f"{k}={_fmt(v, self.rule.hyperparameters[k].kind)}" for k, v in self.values.items()]
        if self.learn is not None:
            parts.append("learn=" + "+".join(self.learn))
        if self.trace == AUTO_TRACE:
            parts.append(f"trace={AUTO_TRACE}")
        elif self.trace:
            parts.append(f"trace={self.trace!r}")
        if self.ramp:
            parts.append(f"ramp={self.ramp!r}")
        if self.normalize:
            parts.append("normalize=true")
        if self.cosine:
            parts.append(f"cosine={self.cosine!r}")
        if self.ramp_search:
            parts.append(f"ramp_search={self.ramp_search!r}")
        if self.timescale:
            t = float(self.timescale)  # a config built directly may hold an int
            parts.append(f"timescale={int(t) if t.is_integer() and t < 1e15 else t!r}")
        return f"{self.rule.name}({','.join(parts)})" if parts else self.rule.name


def _fmt(v: float, kind: str) -> str:
    if kind == "flag":
        return "true" if v else "false"
    return repr(float(v))


def resolve_learn(k: int, cfg: LevelConfig, values: dict[str, float], *, top: bool, mode: str) -> tuple[str, ...]:
    """What the level above learns of level ``k`` in a tower: ``cfg.learn``, or the default for ``mode``.

    Raises:
        ValueError: for ``learn=`` on the top level (nothing above learns it), or names ``cfg.rule`` lacks.
    """
    if cfg.learn is not None and top:
        raise ValueError(
            f"level {k} ({cfg.rule.name}) is the top of the tower, so nothing learns its "
            f"hyperparameters: drop learn={'+'.join(cfg.learn)} or add a level above it"
        )
    if top:
        return ()
    learn = (
        cfg.learn if cfg.learn is not None else (cfg.rule(mode).gdtuo_learned(values) if mode == "gdtuo" else ("lr",))
    )
    try:
        return cfg.rule.check_learn(learn)
    except ValueError as err:
        raise ValueError(f"level {k} ({cfg.rule.name}): {err}") from None


def where(level: int | None, name: str) -> str:
    """How an error names a level: ``level 1 (adam)``, or ``adam`` for a level not yet in a tower."""
    return name if level is None else f"level {level} ({name})"


def as_number(at: str, name: str, value: Any, flag: bool = False) -> float:
    """``value`` as a float: a real number, a bool for a ``flag`` (only there: ``True`` where a step size
    belongs is a mistake, such as a call in another argument order), or a one-element tensor as
    ``torch.optim`` takes for ``lr``. Anything else (a string, ``None``) raises ``ValueError`` naming it."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    prefix = f"{at}: " if at else ""
    if isinstance(value, (bool, np.bool_)):
        if not flag:
            raise ValueError(f"{prefix}{name}={value!r} is a bool, not a number")
        return float(value)
    if not isinstance(value, numbers.Real):
        raise ValueError(f"{prefix}{name}={value!r} is not a number")
    return float(value)


def validate_value(level: int | None, rule: type[Rule], name: str, value: Any) -> None:
    """Raise ``ValueError`` naming the level, the hyperparameter and the allowed range."""
    spec = rule.hyperparameters[name]
    at = where(level, rule.name)
    value = as_number(at, name, value, flag=spec.kind == "flag")
    if not math.isfinite(value):
        raise ValueError(f"{at}: {name}={value!r} is not finite")
    if spec.kind == "step" and value < 0:
        raise ValueError(f"{at}: {name}={value!r} is negative; {name} must be >= 0")
    if spec.kind == "unit" and not 0.0 <= value < 1.0:
        raise ValueError(f"{at}: {name}={value!r} is outside [0, 1)")


def validate_level_options(
    level: int | None,
    name: str,
    trace: float | str,
    ramp: float,
    normalize: bool,
    *,
    placed: bool = True,
    cosine: float = 0.0,
    ramp_search: float = 0.0,
    timescale: float = 0.0,
) -> None:
    """Raise ``ValueError`` for a level option out of range or on a level where it means nothing.

    ``trace`` (a decay in ``[0, 1)``, or ``"auto"``) and ``normalize`` shape the hypergradient a level learns from,
    and ``timescale`` (a number of steps, ``>= 0``) a level's own step size, so they belong to a level
    above the weights; ``ramp`` is checked by :func:`.ramp.validate_ramp`.
    :func:`checked_level` checks the ranges when a level is written (``placed=False``: a ``hyper=`` spec
    or an upper level is built on its own, so its first level is not the weights'), and both in the
    tower's constructor, which knows each level's place.
    """
    at = where(level, name)
    if trace != AUTO_TRACE and (
        isinstance(trace, (bool, np.bool_))
        or not (isinstance(trace, numbers.Real) and math.isfinite(trace) and 0.0 <= trace < 1.0)
    ):
        raise ValueError(f"{at}: trace={trace!r} is neither a decay in [0, 1) nor {AUTO_TRACE!r}")
    if isinstance(timescale, (bool, np.bool_)) or not (
        isinstance(timescale, numbers.Real) and math.isfinite(timescale) and timescale >= 0.0
    ):
        raise ValueError(f"{at}: timescale={timescale!r} must be a number of steps >= 0 (0: a constant step size)")
    if placed and level == 0:
        for key, value in (("trace", trace), ("normalize", normalize)):
            if value:
                shown = "true" if value is True else repr(value)
                raise ValueError(
                    f"level 0 ({name}): {key}={shown} belongs to a level above the weights (it shapes the "
                    "hypergradient that level learns from); move it to level 1"
                )
        if timescale:
            raise ValueError(
                f"level 0 ({name}): timescale={timescale!r} shrinks the step size of a level above the weights; "
                "for the weights' learning rate use an LR scheduler (the Trainer's lr_scheduler_type, or "
                "transformers.get_inverse_sqrt_schedule), which multiplies the learned lr"
            )
    validate_ramp(at, ramp, placed=placed and level != 1)
    validate_ramp_search(at, ramp_search, ramp)
    if isinstance(cosine, bool) or not (
        isinstance(cosine, (int, float)) and math.isfinite(cosine) and 0.0 <= cosine <= 1.0
    ):
        raise ValueError(f"{at}: cosine={cosine!r} is outside [0, 1]")
    if placed and cosine and level != 1:
        raise ValueError(
            f"{at}: cosine={cosine!r} divides by the weights' next gradient, so it belongs to level 1 (the level "
            "above the weights)"
        )


def checked_level(
    level: int | None,
    rule: type[Rule],
    values: dict[str, float],
    learn: Iterable[str] | None = None,
    trace: float | str = 0.0,
    ramp: float = 0.0,
    normalize: bool = False,
    *,
    source: str = "",
    placed: bool = False,
    cosine: float = 0.0,
    ramp_search: float = 0.0,
    timescale: float = 0.0,
) -> LevelConfig:
    """A :class:`LevelConfig` whose values, ``learn=`` names and options are checked.

    The one check of a level as it is written, whether in a spec string, an optimizer's constructor or
    ``HyperTrainingArguments`` (through its spec). Where the level sits in a tower (``trace`` above the
    weights, ``ramp`` on level 1) is checked too with ``placed=True``, which the tower's constructor
    passes; that nothing learns the top's hyperparameters, :func:`resolve_learn` checks.

    Args:
        level: the level's place in what is being built, for messages (``None``: an upper level on its own).
        source: where the level was written, appended to the level in messages (`` of tower spec '...'``).
        placed: ``level`` is the level's place in a tower (not in a ``hyper=`` spec or an upper level
            written on its own, whose first level is not the weights').

    Raises:
        ValueError: naming the level, the bad value and what is allowed.
    """
    at = where(level, rule.name) + source
    for name, value in values.items():
        if name not in rule.hyperparameters:
            raise ValueError(f"{at}: unknown hyperparameter {name!r}; allowed: {', '.join(rule.hyperparameters)}")
        validate_value(level, rule, name, value)
    if learn is not None:
        try:
            learn = rule.check_learn(learn)
        except ValueError as err:
            raise ValueError(f"{at}: {err}") from None
    validate_level_options(
        level,
        rule.name,
        trace,
        ramp,
        normalize,
        placed=placed,
        cosine=cosine,
        ramp_search=ramp_search,
        timescale=timescale,
    )
    if timescale and "lr" not in rule.hyperparameters:
        raise ValueError(f"{at}: timescale={timescale!r} shrinks a level's lr, and {rule.name} has none")
    if values.get("nesterov") and not values.get("momentum", rule.hyperparameters["momentum"].default):
        raise ValueError(f"{at}: nesterov=true needs momentum > 0")  # as torch.optim.SGD, at every level
    return LevelConfig(rule, dict(values), learn, trace, ramp, normalize, cosine, float(ramp_search), float(timescale))
