"""The public optimizers: ``HyperSGD``, ``HyperAdam``, ``HyperAdamW``, ``HyperAdaGrad``, ``HyperRMSProp``.

Each is a ``torch.optim.Optimizer`` whose weight level is the named algorithm and which learns that
level's hyperparameters with the tower given by ``hyper``::

    opt = HyperAdam(model.parameters(), lr=1e-3, hyper=HyperSGD(lr=1e-5))   # Adam / SGD(1e-5)
    opt = HyperAdam(model.parameters(), lr=1e-3,
                    hyper=HyperAdam(lr=1e-2, hyper=HyperSGD(lr=1e-4)))      # height 2

Levels above the weights are written without parameters: the class then gives a plain description
of the levels (:class:`UpperLevels`), not an optimizer. ``hyper=None`` gives the plain algorithm
(height 0); a spec string (``hyper="sgd(lr=1e-5)"``) is accepted too.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..levels import AdaGradRule, AdamRule, AdamWRule, RMSPropRule, Rule, SGDRule
from .config import LevelConfig, as_number, checked_level, where
from .engine import TowerOptimizer
from .spec import parse_spec
from .stepping import beta_pair, refuse_torch_only

# The level above the weights when none is given. It learns log(lr) from the slope of the next loss
# along the last update (normalize=true), a signal whose size does not follow the lr, so Adam moves
# log(lr) by at most its step size per step in whichever direction the slope keeps. ramp=0.001 starts
# the learned lr where one step moves the weights by 0.1% of their norm, reached geometrically from a
# smaller initial lr and at once from a larger one, so the initial lr decides little. ramp_search=0.3
# keeps doubling it from there while the next gradient still points along the last update (a cosine
# of 0.3 or more): a problem whose gradients stay aligned searches, a noisy one (or Adam on a
# transformer) stops at once and takes the plain ramp's steps. timescale=100 keeps the level's pace for
# its first 100 steps and then shrinks it as sqrt(100 / t): a small bias of the hypergradient that keeps
# its sign over a long run (its greed over one step, the push of batches drawn in epochs) then moves
# log(lr) as sqrt(t) rather than t, and a run of a few hundred steps is hardly changed. trace=auto
# learns from the hypergradient of the lr held over one pass through the data (the Trainer integration
# sets the horizon; a plain loop calls set_horizon), whose sign is an epoch's, not one minibatch's; a
# shorter trace is greedy over a long stream, a longer one reaches back over several epochs of a small
# dataset. beta1=0: the trace already averages over steps; with Adam's momentum on top of it the noisy
# quadratic's learned lr missed its target. Evidence and the sweeps that chose it: results/README.md
# (benchmarks/sensitivity.py, benchmarks/quadratic.py). gdtuo mode uses the paper's choice.
DEFAULT_HYPER = {
    "default": "adam(lr=0.05,beta1=0.0,trace=auto,ramp=0.001,normalize=true,ramp_search=0.3,timescale=100)",
    "gdtuo": "sgd(lr=1e-5)",
}

_DEFAULT = "default"


def default_hyper(compat: str | None = None, learn: str | Iterable[str] | None = None) -> str:
    """``DEFAULT_HYPER`` for a weight level that learns ``learn``: without a learned ``lr``, no ramp (and
    no search past it).

    The ramp sizes the weights' learned step size, so a tower that learns only, say, ``momentum`` takes
    the default without it rather than an error about an option the user never wrote.
    """
    spec = DEFAULT_HYPER.get(compat or "default", DEFAULT_HYPER["default"])
    names = _learn_tuple(learn)
    if names is None or "lr" in names:
        return spec
    return "/".join(dataclasses.replace(c, ramp=0.0, ramp_search=0.0).to_spec() for c in parse_spec(spec))


def _learn_tuple(learn: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if learn is None:
        return None
    if isinstance(learn, str):
        return Rule.split_learn(learn)
    names = tuple(learn) if isinstance(learn, Iterable) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise ValueError(f"learn={learn!r}: give hyperparameter names, joined by '+' ('lr+beta1') or as a list")
    return names


@dataclass(frozen=True)
class UpperLevels:
    """Levels above the weights, written as an optimizer class without parameters: ``HyperSGD(lr=1e-5)``.

    A plain description for ``hyper=``, not an optimizer: it holds level configs, checked when written,
    and owns no parameters. ``HyperAdam(lr=0.01, hyper=HyperSGD(lr=1e-4))`` is two levels, bottom first.
    """

    levels: tuple[LevelConfig, ...]
    written_as: str  # the class it was written with, for its repr

    def step(self, closure: Any = None) -> None:
        raise RuntimeError(
            f"this {self.written_as} has no parameters: it is an upper level, meant for hyper=...; create it "
            "with params to train a model"
        )

    def __repr__(self) -> str:
        return f"{self.written_as}({'/'.join(c.to_spec() for c in self.levels)})"


class _HyperOptimizer(TowerOptimizer):
    """A tower whose weight level is ``rule``; without ``params``, the class gives :class:`UpperLevels` instead.

    The constructors take ``torch.optim``'s arguments in ``torch.optim``'s order, so that code written for
    the ``torch.optim`` class runs unchanged. Those the tower does not implement (``amsgrad``,
    ``maximize``, ``dampening``, ...) are accepted at the values the tower runs as (``torch.optim``'s
    defaults; ``foreach`` any: the tower always runs multi-tensor kernels) and refused otherwise.
    """

    rule: type[Rule]

    @classmethod
    def _check_torch_only(cls, arguments: dict[str, Any]) -> None:
        """Refuse the constructor's ``arguments`` (``locals()`` of ``__init__``) that set one of ``torch_only``
        to a value the tower does not run as."""
        refuse_torch_only(arguments, cls.torch_only, cls.__name__)

    def __new__(cls, params=None, *args: Any, **kwargs: Any):
        if params is None:
            # Described by the arguments of the built-in class it derives from: a subclass's own
            # __init__ (extra arguments, **kwargs) has nothing to set on a level that owns no parameters.
            builtin = next(c for c in cls.__mro__ if c.__module__ == __name__)
            try:
                bound = inspect.signature(builtin.__init__).bind(None, None, *args, **kwargs)
            except TypeError as e:
                raise TypeError(
                    f"{cls.__name__}(...) without params is an upper level, written with the arguments of "
                    f"{builtin.__name__}: {e}"
                ) from None
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            for name in ("self", "params"):
                arguments.pop(name)
            options = {k: arguments.pop(k) for k in ("learn", "scope", "compat", "hyper")}
            given = {k: options[k] for k in ("scope", "compat") if bound.signature.parameters[k].default != options[k]}
            if given:
                written = ", ".join(f"{k}={v!r}" for k, v in given.items())
                raise ValueError(
                    f"{cls.__name__}(...) without params is an upper level, and "
                    f"{written} {'is' if len(given) == 1 else 'are'} the whole tower's: give it to the optimizer of "
                    f"the weights, e.g. HyperAdam(params, {written}, hyper={cls.__name__}(...))"
                )
            builtin._check_torch_only(arguments)
            for name in builtin.torch_only:
                del arguments[name]
            hyper = None if isinstance(options["hyper"], str) and options["hyper"] == _DEFAULT else options["hyper"]
            level = cls._level(cls._values(**arguments), options["learn"], None)
            return UpperLevels((level, *_levels_of(hyper)), cls.__name__)
        return super().__new__(cls)

    def __getnewargs__(self) -> tuple[Any, ...]:
        # copy and pickle call __new__ with these: any params but None give an optimizer, whose state
        # __setstate__ then fills in.
        return ([],)

    @classmethod
    def _values(cls, **arguments: Any) -> dict[str, Any]:
        """The rule's values from the constructor's arguments, which are the rule's hyperparameters by name
        unless a class says otherwise (Adam's ``betas``); :meth:`_level` checks that they are numbers."""
        return arguments

    @classmethod
    def _level(cls, values: dict[str, Any], learn, level: int | None) -> LevelConfig:
        """This class's level, keeping only the values that differ from the rule's defaults (the spec's form)."""
        defaults = {n: s.default for n, s in cls.rule.hyperparameters.items()}
        at = where(level, cls.rule.name)
        kinds = {k: spec.kind for k, spec in cls.rule.hyperparameters.items()}
        numbers = {k: as_number(at, k, v, flag=kinds[k] == "flag") for k, v in values.items()}
        explicit = {k: v for k, v in numbers.items() if v != defaults[k]}
        return checked_level(level, cls.rule, explicit, _learn_tuple(learn))

    def _setup(self, params, values: dict[str, float], learn, scope: str, compat: str | None, hyper) -> None:
        if isinstance(hyper, str) and hyper == _DEFAULT:
            # An unknown compat falls back here; TowerOptimizer refuses it with the allowed values.
            hyper = default_hyper(compat, learn)
        levels = [self._level(values, learn, 0), *_levels_of(hyper)]
        TowerOptimizer.__init__(self, params, levels, scope=scope, compat=compat)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, scope={self.scope!r}, compat={None if self.mode == 'default' else self.mode!r})"


def _levels_of(hyper: Any) -> list[LevelConfig]:
    if hyper is None:
        return []
    if isinstance(hyper, str):
        return parse_spec(hyper)
    if isinstance(hyper, UpperLevels):
        return list(hyper.levels)
    if isinstance(hyper, _HyperOptimizer):
        raise ValueError(f"hyper={type(hyper).__name__}(...) was given parameters; upper levels take none")
    raise ValueError(f"hyper={hyper!r} is not a Hyper* optimizer without parameters, a spec string or None")


class HyperSGD(_HyperOptimizer):
    """SGD (with momentum and Nesterov momentum) that learns its hyperparameters; see :class:`~hf_hyperopt.levels.SGDRule`.

    Args:
        params: parameters or param groups; ``None`` for an upper level.
        lr, momentum, weight_decay, nesterov: as in ``torch.optim.SGD``.
        dampening, maximize, foreach, differentiable, fused: ``torch.optim.SGD``'s, at their defaults
            (others are refused).
        learn: what the level above learns, ``"lr"`` by default (``"lr+momentum"``, ...).
        scope: ``"shared"``, ``"group"`` or ``"tensor"``: one learned set for all groups, per group,
            or per parameter tensor (the paper's per-parameter SGD).
        compat: ``"gdtuo"`` to reproduce the paper's reference implementation.
        hyper: the level(s) above; the default is ``DEFAULT_HYPER``; ``None`` for none.
    """

    rule = SGDRule
    torch_only = {"dampening": (0.0,), "maximize": (False,), "foreach": (None, True, False),
                  "differentiable": (False,), "fused": (None, False)}  # fmt: skip

    def __init__(
        self,
        params=None,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        learn=None,
        scope: str = "shared",
        compat: str | None = None,
        hyper=_DEFAULT,
    ):
        self._check_torch_only(locals())
        values = self._values(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        self._setup(params, values, learn, scope, compat, hyper)


class HyperAdam(_HyperOptimizer):
    """Adam that learns its hyperparameters; see :class:`~hf_hyperopt.levels.AdamRule`.

    Args:
        params: parameters or param groups; ``None`` for an upper level.
        lr, betas, eps, weight_decay: as in ``torch.optim.Adam``.
        amsgrad, foreach, maximize, capturable, differentiable, fused, decoupled_weight_decay:
            ``torch.optim.Adam``'s, at their defaults (others are refused; for decoupled weight decay
            use :class:`HyperAdamW`).
        learn, scope, compat, hyper: see :class:`HyperSGD`. ``learn`` names: ``lr``, ``beta1``,
            ``beta2``, ``eps``, ``weight_decay``.
    """

    rule = AdamRule
    torch_only = {"amsgrad": (False,), "foreach": (None, True, False), "maximize": (False,), "capturable": (False,),
                  "differentiable": (False,), "fused": (None, False), "decoupled_weight_decay": (False,)}  # fmt: skip

    def __init__(
        self,
        params=None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        learn=None,
        scope: str = "shared",
        compat: str | None = None,
        hyper=_DEFAULT,
    ):
        self._check_torch_only(locals())
        values = self._values(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._setup(params, values, learn, scope, compat, hyper)

    @classmethod
    def _values(cls, lr, betas, eps, weight_decay) -> dict[str, Any]:
        wd = cls.rule.hyperparameters["weight_decay"].default if weight_decay is None else weight_decay
        beta1, beta2 = beta_pair(cls.rule.name, betas)
        return {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": wd}


class HyperAdamW(HyperAdam):
    """AdamW (decoupled weight decay, default 1e-2) that learns its hyperparameters."""

    rule = AdamWRule
    # torch.optim.AdamW has no decoupled_weight_decay (it is always decoupled): either value means AdamW.
    torch_only = {**HyperAdam.torch_only, "decoupled_weight_decay": (False, True)}


class HyperAdaGrad(_HyperOptimizer):
    """AdaGrad that learns its hyperparameters; see :class:`~hf_hyperopt.levels.AdaGradRule`.

    The arguments of ``torch.optim.Adagrad``, in its order; ``lr_decay``, ``initial_accumulator_value``,
    ``maximize``, ``differentiable`` and ``fused`` only at their defaults.
    """

    rule = AdaGradRule
    torch_only = {"lr_decay": (0.0,), "initial_accumulator_value": (0.0,), "foreach": (None, True, False),
                  "maximize": (False,), "differentiable": (False,), "fused": (None, False)}  # fmt: skip

    def __init__(
        self,
        params=None,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        learn=None,
        scope: str = "shared",
        compat: str | None = None,
        hyper=_DEFAULT,
    ):
        self._check_torch_only(locals())
        self._setup(params, self._values(lr=lr, eps=eps, weight_decay=weight_decay), learn, scope, compat, hyper)


class HyperRMSProp(_HyperOptimizer):
    """RMSProp that learns its hyperparameters; see :class:`~hf_hyperopt.levels.RMSPropRule`.

    The arguments of ``torch.optim.RMSprop``, in its order (``alpha`` is the smoothing constant);
    ``momentum``, ``centered``, ``capturable``, ``maximize`` and ``differentiable`` only at their defaults.
    """

    rule = RMSPropRule
    torch_only = {"momentum": (0.0,), "centered": (False,), "capturable": (False,), "foreach": (None, True, False),
                  "maximize": (False,), "differentiable": (False,)}  # fmt: skip

    def __init__(
        self,
        params=None,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        learn=None,
        scope: str = "shared",
        compat: str | None = None,
        hyper=_DEFAULT,
    ):
        self._check_torch_only(locals())
        values = self._values(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay)
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
    opt = TowerOptimizer.__new__(cls)
    TowerOptimizer.__init__(opt, params, levels, scope=scope, compat=compat)
    return opt
