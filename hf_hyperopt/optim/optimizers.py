"""The public optimizers: ``HyperSGD``, ``HyperAdam``, ``HyperAdamW``, ``HyperAdaGrad``, ``HyperRMSProp``.

Each is a ``torch.optim.Optimizer`` whose weight level is the named algorithm and which learns that
level's hyperparameters with the tower given by ``hyper``::

    opt = HyperAdam(model.parameters(), lr=1e-3, hyper=HyperSGD(lr=1e-5))   # Adam / SGD(1e-5)
    opt = HyperAdam(model.parameters(), lr=1e-3,
                    hyper=HyperAdam(lr=1e-2, hyper=HyperSGD(lr=1e-4)))      # height 2

Levels above the weights are written without parameters. ``hyper=None`` gives the plain algorithm
(height 0); a spec string (``hyper="sgd(lr=1e-5)"``) is accepted too.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from ..levels import AdaGradRule, AdamRule, AdamWRule, RMSPropRule, Rule, SGDRule
from .config import LevelConfig
from .engine import TowerOptimizer
from .spec import parse_spec

# The level above the weights when none is given. It learns log(lr) from the slope of the next loss
# along the last update (normalize=true), a signal whose size does not follow the lr, so Adam moves
# log(lr) by at most its step size per step in whichever direction the slope keeps. ramp=0.001 starts
# the learned lr where one step moves the weights by 0.1% of their norm, reached geometrically from a
# smaller initial lr and at once from a larger one, so the initial lr decides little. Evidence and the
# sweeps that chose it: results/README.md (benchmarks/sensitivity.py). gdtuo mode uses the paper's choice.
DEFAULT_HYPER = {"default": "adam(lr=0.05,ramp=0.001,normalize=true)", "gdtuo": "sgd(lr=1e-5)"}

_DEFAULT = "default"


def default_hyper(compat: str | None = None, learn: str | Iterable[str] | None = None) -> str:
    """``DEFAULT_HYPER`` for a weight level that learns ``learn``: without a learned ``lr``, no ramp.

    The ramp sizes the weights' learned step size, so a tower that learns only, say, ``momentum`` takes
    the default without it rather than an error about an option the user never wrote.
    """
    spec = DEFAULT_HYPER.get(compat or "default", DEFAULT_HYPER["default"])
    names = _learn_tuple(learn)
    if names is None or "lr" in names:
        return spec
    return "/".join(dataclasses.replace(c, ramp=0.0).to_spec() for c in parse_spec(spec))


def _learn_tuple(learn: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if learn is None:
        return None
    if isinstance(learn, str):
        return tuple(s.strip() for s in learn.split("+") if s.strip())
    return tuple(learn)


class _HyperOptimizer(TowerOptimizer):
    rule: type[Rule]

    def _setup(self, params, values: dict[str, float], learn, scope: str, compat: str | None, hyper) -> None:
        defaults = {n: s.default for n, s in self.rule.hyperparameters.items()}
        explicit = {k: float(v) for k, v in values.items() if float(v) != defaults[k]}
        self._config = LevelConfig(self.rule, explicit, _learn_tuple(learn))
        bound = params is not None
        if isinstance(hyper, str) and hyper == _DEFAULT:
            # An unknown compat falls back here; TowerOptimizer refuses it with the allowed values.
            hyper = default_hyper(compat, learn) if bound else None
        above = _levels_of(hyper)
        self._above = above
        if not bound:
            self._unbound = True
            # torch.optim wraps step() of every Optimizer subclass in a hook runner that reads these;
            # without them an upper level's step() would fail before it can say why.
            self._optimizer_step_pre_hooks = OrderedDict()
            self._optimizer_step_post_hooks = OrderedDict()
            return
        self._unbound = False
        TowerOptimizer.__init__(self, params, [self._config, *above], scope=scope, compat=compat)

    def step(self, closure=None):  # type: ignore[override]
        if getattr(self, "_unbound", False):
            raise RuntimeError(
                f"this {type(self).__name__} has no parameters: it is an upper level, meant for hyper=...; "
                "create it with params to train a model"
            )
        return super().step(closure)

    def __repr__(self) -> str:
        if getattr(self, "_unbound", False):
            return f"{type(self).__name__}({'/'.join(c.to_spec() for c in [self._config, *self._above])})"
        return f"{type(self).__name__}({self.spec!r}, scope={self.scope!r}, compat={None if self.mode == 'default' else self.mode!r})"


def _levels_of(hyper: Any) -> list[LevelConfig]:
    if hyper is None:
        return []
    if isinstance(hyper, str):
        return parse_spec(hyper)
    if isinstance(hyper, _HyperOptimizer):
        if not getattr(hyper, "_unbound", False):
            raise ValueError(f"hyper={type(hyper).__name__}(...) was given parameters; upper levels take none")
        return [hyper._config, *hyper._above]
    raise ValueError(f"hyper={hyper!r} is not a Hyper* optimizer without parameters, a spec string or None")


class HyperSGD(_HyperOptimizer):
    """SGD (with momentum and Nesterov momentum) that learns its hyperparameters; see :class:`~hf_hyperopt.levels.SGDRule`.

    Args:
        params: parameters or param groups; ``None`` for an upper level.
        lr, momentum, weight_decay, nesterov: as in ``torch.optim.SGD`` (no dampening).
        learn: what the level above learns, ``"lr"`` by default (``"lr+momentum"``, ...).
        scope: ``"shared"``, ``"group"`` or ``"tensor"``: one learned set for all groups, per group,
            or per parameter tensor (the paper's per-parameter SGD).
        compat: ``"gdtuo"`` to reproduce the paper's reference implementation.
        hyper: the level(s) above; the default is ``DEFAULT_HYPER``; ``None`` for none.
    """

    rule = SGDRule

    def __init__(
        self,
        params=None,
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        learn=None,
        scope: str = "shared",
        compat: str | None = None,
        hyper=_DEFAULT,
    ):
        values = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": float(nesterov)}
        self._setup(params, values, learn, scope, compat, hyper)


class HyperAdam(_HyperOptimizer):
    """Adam that learns its hyperparameters; see :class:`~hf_hyperopt.levels.AdamRule`.

    Args:
        params: parameters or param groups; ``None`` for an upper level.
        lr, betas, eps, weight_decay: as in ``torch.optim.Adam``.
        learn, scope, compat, hyper: see :class:`HyperSGD`. ``learn`` names: ``lr``, ``beta1``,
            ``beta2``, ``eps``, ``weight_decay``.
    """

    rule = AdamRule

    def __init__(
        self,
        params=None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        *,
        learn=None,
        scope: str = "shared",
        compat: str | None = None,
        hyper=_DEFAULT,
    ):
        wd = self.rule.hyperparameters["weight_decay"].default if weight_decay is None else weight_decay
        values = {"lr": lr, "beta1": betas[0], "beta2": betas[1], "eps": eps, "weight_decay": wd}
        self._setup(params, values, learn, scope, compat, hyper)


class HyperAdamW(HyperAdam):
    """AdamW (decoupled weight decay, default 1e-2) that learns its hyperparameters."""

    rule = AdamWRule


class HyperAdaGrad(_HyperOptimizer):
    """AdaGrad that learns its hyperparameters; see :class:`~hf_hyperopt.levels.AdaGradRule`."""

    rule = AdaGradRule

    def __init__(
        self,
        params=None,
        lr: float = 1e-2,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        *,
        learn=None,
        scope: str = "shared",
        compat: str | None = None,
        hyper=_DEFAULT,
    ):
        values = {"lr": lr, "eps": eps, "weight_decay": weight_decay}
        self._setup(params, values, learn, scope, compat, hyper)


class HyperRMSProp(_HyperOptimizer):
    """RMSProp that learns its hyperparameters; see :class:`~hf_hyperopt.levels.RMSPropRule`.

    ``alpha`` is the smoothing constant, as in ``torch.optim.RMSprop``.
    """

    rule = RMSPropRule

    def __init__(
        self,
        params=None,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        learn=None,
        scope: str = "shared",
        compat: str | None = None,
        hyper=_DEFAULT,
    ):
        values = {"lr": lr, "alpha": alpha, "eps": eps, "weight_decay": weight_decay}
        self._setup(params, values, learn, scope, compat, hyper)


OPTIMIZERS: dict[str, type[_HyperOptimizer]] = {
    c.rule.name: c for c in (HyperSGD, HyperAdam, HyperAdamW, HyperAdaGrad, HyperRMSProp)
}


def tower(params, spec: str, *, scope: str = "shared", compat: str | None = None) -> TowerOptimizer:
    """Build a tower optimizer from a spec string, e.g. ``tower(params, "adam(lr=1e-3)/sgd(lr=1e-5)")``.

    The result is an instance of the weight level's class (``HyperAdam`` here). A spec of one level
    (``"adam(lr=1e-3)"``) gives the plain algorithm, with nothing learned.
    """
    levels = parse_spec(spec)
    cls = OPTIMIZERS[levels[0].rule.name]
    opt = cls.__new__(cls)
    opt._config, opt._above, opt._unbound = levels[0], levels[1:], False
    TowerOptimizer.__init__(opt, params, levels, scope=scope, compat=compat)
    return opt
