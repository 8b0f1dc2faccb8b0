"""The tower engine: one ``torch.optim.Optimizer`` that runs a stack of optimizer levels.

How hypergradients are obtained (Chandra et al., 2022, section 2). A level updates its parameters
``w`` with hyperparameters ``theta``: ``w_{t+1} = rule(w_t, g_t, state_t; theta_t)``. With ``w_t``,
``g_t`` and the state held constant (the paper's detaching), the next loss depends on ``theta_t`` only
through ``w_{t+1}``, so::

    dL_{t+1}/dtheta_t = < g_{t+1}, dw_{t+1}/dtheta_t >

The engine computes the *tangent* ``dw_{t+1}/dtheta_t`` while it takes step ``t`` and keeps it (one
buffer the size of ``w`` per learned hyperparameter): the level's rule writes it beside its update, or,
for a rule that does not, forward-mode autograd runs the rule with ``theta`` as a dual number
(:mod:`.tangents`). At step ``t+1`` the hypergradient is one multi-tensor
product and a sum. The paper obtains the same number by reverse mode through a graph that spans two
steps, which needs ``backward(create_graph=True)`` and non-leaf weights; forward mode needs neither,
so the weights stay ordinary ``nn.Parameter`` leaves and the training loop stays ordinary.

Level ``k + 1`` treats the learned (raw) hyperparameters of level ``k`` as its parameters and their
hypergradients as its gradients, with the same rule code. Within a step the hypergradients are
computed bottom-up (each needs the one below), then the levels step top-down, each using the freshly
updated hyperparameters of the level above: the reference implementation's order.

The engine, by concern: :mod:`.config` (level configs and their checks), :mod:`.state` (the tower's
state and its state-dict form), :mod:`.buckets` (where the weight level's tangents are stored),
:mod:`.hypergradients`, :mod:`.stepping` (the levels' steps) and :mod:`.tangents` (running a rule
and keeping its tangent); :mod:`.checks`, :mod:`.rollback`, :mod:`.ramp` and :mod:`.distributed`
beside them. This module holds the optimizer class that ties them together.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..levels.base import MODES, Mode, Rule, parametrisation, raw_bounds, to_natural, to_raw
from .buckets import SCALE_PREFIX, Bucket, build_buckets, collect, hold_saved_tangents, zero_idle_tangents
from .checks import checked_tower_state
from .config import (
    AUTO_TRACE,
    AUTO_TRACE_STEPS,
    SCOPES,
    LevelConfig,
    checked_level,
    resolve_learn,
    trace_decay,
    validate_level_options,
    validate_value,
)
from .distributed import TOWER_GROUP_KEY, local_tensor, sharding_group, standalone
from .hypergradients import hypergradients, measure_ramp
from .ramp import RAMP_PROBE
from .rollback import rollback_on_error
from .state import TowerState, initial_state, read_tower_entry, tower_entry
from .stepping import (
    check_group_options,
    check_group_values,
    check_learned_unwritten,
    check_schedule_bases,
    count_step,
    group_defaults,
    group_value,
    learned_group_values,
    schedule_factor,
    step_upper_levels,
    step_weights,
)

__all__ = ["SCOPES", "LevelConfig", "TowerOptimizer", "validate_level_options", "validate_value"]


# The options of a level that change what it learns (compared when a state dict is loaded).
LEVEL_OPTIONS = ("trace", "ramp", "normalize", "cosine", "ramp_search", "timescale")


class DifferentTowerError(ValueError):
    """A state dict saved by a tower of another spec, scope or mode: every checkpoint of that run is refused
    alike, so what loads it is that tower, not an earlier checkpoint."""


class TowerOptimizer(torch.optim.Optimizer):
    """A tower of optimizer levels; level 0 updates the parameters, level ``k+1`` learns level ``k``.

    Use the named classes (:class:`~hf_hyperopt.HyperAdam`, ...) or :func:`~hf_hyperopt.tower`
    rather than this class directly.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer. Group keys follow
            ``torch.optim`` (``lr``, ``betas``, ``eps``, ``weight_decay``, ``momentum``, ``alpha``).
        levels: the levels, bottom (weights) first. ``levels[0].values`` are the group defaults.
        scope: ``"shared"`` (one set of learned hyperparameters for all groups, the paper),
            ``"group"`` (one per param group) or ``"tensor"`` (one per parameter tensor).
        compat: ``None`` for ``torch.optim`` semantics with guarded parametrisations, or ``"gdtuo"``
            to reproduce the paper's reference implementation.

    Default-mode parametrisation and guards: a learned step (``lr``, ``eps``, ``weight_decay``) is
    learned as its logarithm, clamped to ``[log 1e-30, log 1e6]``, so it is always positive and
    finite; a learned rate (``momentum``, betas, ``alpha``) as its logit, clamped to ``[-15, 15]``.
    A hypergradient that is NaN or infinite is replaced by zero for that step and the hyperparameter
    keeps its value; such skips are counted (:meth:`skipped_hyper_updates`).
    """

    # torch.optim's options that the weight level does not implement, and the values it runs as (the
    # optimizer classes fill it in): any other value is refused, in the constructor or a param group.
    torch_only: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        levels: list[LevelConfig],
        scope: str = "shared",
        compat: str | None = None,
    ):
        mode: Mode = "default" if compat is None else compat  # type: ignore[assignment]
        if mode not in MODES or mode == "default" and compat is not None:
            raise ValueError(f"compat={compat!r} is not supported; use None or 'gdtuo'")
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r} is not one of {', '.join(SCOPES)}")
        if not levels:
            raise ValueError("a tower needs at least one level")
        self.mode: Mode = mode
        self.scope = scope
        self.levels = levels
        self._rules: list[Rule] = []
        self._learn: list[tuple[str, ...]] = []
        for k, cfg in enumerate(levels):
            values = cfg.full_values()
            # A level config may be built directly: the checks every level gets when written, and its place's.
            checked_level(
                k,
                cfg.rule,
                cfg.values,
                cfg.learn,
                cfg.trace,
                cfg.ramp,
                cfg.normalize,
                placed=True,
                cosine=cfg.cosine,
                ramp_search=cfg.ramp_search,
                timescale=cfg.timescale,
            )
            self._learn.append(resolve_learn(k, cfg, values, top=k == len(levels) - 1, mode=mode))
            options: dict[str, bool] = {"nesterov": bool(values.get("nesterov", 0.0))}
            if "momentum" in self._learn[k]:
                options["learn_momentum"] = True
            if mode == "gdtuo":
                options.update(gdtuo_init=True, eps_in_sqrt=True)
            if k == 0 and len(levels) > 1:
                # A rule may keep tangents that are multiples of its state there (Rule.held_tangents),
                # unless a trace accumulates them across steps: trace=auto counts as one whatever its
                # horizon, which is set after construction (and after loading), so the layout cannot follow it.
                options.update(hold=not levels[1].trace, has_momentum=bool(values.get("momentum", 0.0)))
            self._rules.append(cfg.rule(mode, **options))
        super().__init__(params, group_defaults(levels[0]))
        for i in range(len(self.param_groups)):
            self._check_group(i)
        # What a hand-set group["lr"] is a factor of until the first step, where no scheduler has set
        # group["initial_lr"]. Kept here, not in the group, until then: a torch scheduler takes an
        # "initial_lr" it finds as its base, so one written now would hide an lr set by hand before the
        # scheduler is made (or CyclicLR's base_lr). The first step writes it (see step()).
        self._built_lrs = [float(g["lr"]) for g in self.param_groups]
        if mode == "gdtuo" and len(levels) > 1 and levels[1].ramp_search:
            raise ValueError(
                f"level 1 ({self._rules[1].name}): ramp_search={levels[1].ramp_search!r} judges the hypergradient of "
                "log(lr), which compat='gdtuo' does not learn (it keeps the lr raw); use the default mode, or "
                "ramp_search=0 on that level"
            )
        if self._ramped() and "lr" not in self._learn[0]:
            raise ValueError(
                f"level 1 ({self._rules[1].name}): ramp={levels[1].ramp!r} ramps the weights' learned lr, but "
                f"level 0 learns {'+'.join(self._learn[0])}; add lr to its learn= or drop the ramp"
            )
        self._check_scope()
        self._check_sharding()
        self._buckets: list[Bucket] | None = None
        self._bucket_key: tuple[int, ...] | None = None
        self._tower_state: TowerState | None = None  # created by the first step
        # The groups' copies of what level 0 learns besides lr, when the tower took them over (first step, load).
        self._learned_start: dict[tuple[int, str], float] = {}
        self._sharding_group: Any = None
        self._horizon: int | None = None  # of trace="auto" (set_horizon)
        self._horizon_warned = False
        self._uses_horizon = any(cfg.trace == AUTO_TRACE for cfg in levels)

    # ------------------------------------------------------------------ construction helpers
    def _check_group(self, i: int) -> None:
        """Refuse param group ``i`` if a value is out of range or it sets what the tower would ignore."""
        check_group_values(self.levels[0].rule, self.param_groups[i])
        check_group_options(self.levels[0], self.param_groups[i], i, self.torch_only)

    def _check_sharding(self) -> None:
        """Refuse, before any step, trainable parameters sharded in ways no single reduction can sum."""
        sharding_group([p for g in self.param_groups for p in g["params"] if p.requires_grad])

    def _check_scope(self) -> None:
        self._check_level0_values(self._learn[0] if len(self.levels) > 1 else ())
        for k in range(1, len(self.levels) - 1):
            values = self.levels[k].full_values()
            for name in self._learn[k]:
                if self.mode == "default":
                    self._check_learnable(k, name, values[name])

    def _check_level0_values(self, names: Iterable[str]) -> None:
        """Refuse the groups' starting values of what level 0 learns: unequal under one shared value, or
        outside the range the default mode keeps them in. Again at the first step, where they start
        (a group's value may have been set since construction)."""
        for name in names:
            vals = [group_value(g, name) for g in self.param_groups]
            if self.scope == "shared" and len(set(vals)) > 1:
                raise ValueError(
                    f"scope='shared' learns one {name} for all param groups, but the groups start at "
                    f"{vals}; use scope='group' or start them equal"
                )
            if self.mode == "default":
                for v in vals:
                    self._check_learnable(0, name, v)

    def _check_learnable(self, k: int, name: str, value: float) -> None:
        """Refuse a learned value that starts outside the range the default mode keeps it in (it would
        be moved to the nearest bound at the first step, silently)."""
        kind, how = self._rules[k].hyperparameters[name].kind, self._how(k, name)
        bounds = raw_bounds(kind)
        # Compared as the raw coordinate, with a margin for the round trip through exp/log.
        inside = (
            value > 0 and (kind == "step" or value < 1) and bounds[0] - 1e-9 <= to_raw(value, how) <= bounds[1] + 1e-9
        )
        if not inside:
            lo, hi = (float(v) for v in to_natural(torch.tensor(bounds, dtype=torch.float64), how))
            raise ValueError(
                f"level {k} ({self._rules[k].name}): cannot learn {name}={value!r}: the default mode learns it as a "
                f"{'logarithm' if kind == 'step' else 'logit'} kept in [{lo:.10g}, {hi:.10g}]; start it in that range"
            )

    @property
    def uses_horizon(self) -> bool:
        """Whether a level learns from ``trace=auto``, whose horizon :meth:`set_horizon` sets."""
        return self._uses_horizon

    @property
    def horizon(self) -> int | None:
        """The steps a ``trace=auto`` spans (:meth:`set_horizon`); ``None`` until one is set."""
        return self._horizon

    def set_horizon(self, steps: int) -> None:
        """Set the horizon of every level with ``trace=auto``: its trace decays by ``1 - 1/steps`` a step.

        Give the optimizer steps of one pass through the training data (of the whole run where that is
        shorter, or where the data is a stream without epochs): the ``Trainer`` integration does, from its
        count of the epoch, before the first step and again on resuming (replacing a horizon set before).
        In your own loop call it before the first step, e.g. with ``min(ceil(len(loader) / accumulation),
        total_steps)``; without it ``trace=auto`` spans 100 steps (with a warning). A tower without
        ``trace=auto`` keeps the horizon and ignores it.
        """
        try:  # ints, numpy integers, one-element integer tensors
            flag = isinstance(steps, bool) or (isinstance(steps, Tensor) and steps.dtype == torch.bool)
            n = None if flag else operator.index(steps)
        except TypeError:
            n = None
        if n is None or n < 1:
            raise ValueError(f"set_horizon(steps={steps!r}): give a whole number of optimizer steps >= 1")
        self._horizon = n

    def schedule_base(self, i: int) -> float:
        """What ``param_groups[i]["lr"]`` is a factor of on the learned step size: a torch scheduler's
        ``initial_lr``, or, where none has set one, the lr the group was built with (a hand-set
        ``group["lr"]`` then scales the learned step size as a schedule would)."""
        group = self.param_groups[i]
        if "initial_lr" in group:
            return float(group["initial_lr"])
        return self._built_lrs[i]

    def schedule_factors(self) -> list[float]:
        """Per param group, the factor a schedule puts on the learned step size: ``group["lr"]`` over
        :meth:`schedule_base`."""
        return [schedule_factor(g["lr"], self.schedule_base(i)) for i, g in enumerate(self.param_groups)]

    def _trace(self, k: int) -> float:
        """The decay of the trace that level ``k`` learns from (``0.0`` for the weights' level)."""
        return trace_decay(self.levels[k].trace, self._horizon) if k > 0 else 0.0

    @property
    def height(self) -> int:
        """Number of levels above the weight level."""
        return len(self.levels) - 1

    @property
    def spec(self) -> str:
        """The tower as a spec string (bottom first), e.g. ``adam(lr=0.001)/sgd(lr=1e-05)``."""
        return "/".join(cfg.to_spec() for cfg in self.levels)

    def learned(self) -> list[tuple[str, ...]]:
        """For each level, the names of its hyperparameters that the level above learns."""
        return list(self._learn)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim``'s ``add_param_group`` with the tower's checks (``__init__`` also calls it).

        In the shared scope a group may be added at any time and trains with the learned values; in
        the group and tensor scopes only before the first step, since the learned values are laid out
        per group (tensor) when the tower starts.
        """
        started = getattr(self, "_tower_state", None) is not None
        if started and self.height and self.scope != "shared":
            raise ValueError(
                f"add_param_group after the first step is not supported with scope={self.scope!r}: the learned "
                "hyperparameters are laid out per group or tensor when the tower starts; add every group "
                "before the first step, or use scope='shared'"
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for p in group["params"]:
                if torch.is_complex(p):
                    raise ValueError(
                        f"complex parameters are not supported: got a {p.dtype} tensor of shape {tuple(p.shape)}; "
                        "keep it as a real tensor with a trailing dimension of 2 (torch.view_as_real)"
                    )
            if hasattr(self, "_buckets"):  # a group added after construction: check it as __init__ does
                self._check_group(len(self.param_groups) - 1)
                self._check_scope()
                self._check_sharding()
                self._buckets = None
        except ValueError:
            self.param_groups.pop()
            raise
        if hasattr(self, "_built_lrs"):
            self._built_lrs.append(float(group["lr"]))
        if started:  # the new tensors have taken no step yet, as in torch.optim; the groups hold their base (step())
            group.setdefault("initial_lr", group["lr"])
            ts = self._tower_state
            ts.weight_steps = [*ts.weight_steps, *[0] * len(group["params"])]
            self._learned_start = {**learned_group_values(self), **self._learned_start}  # the new group's, as it is

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Pickled by an earlier version: every group held its initial_lr then, and there was no horizon.
        if "_built_lrs" not in self.__dict__:
            self._built_lrs = [float(g.get("initial_lr", g["lr"])) for g in self.param_groups]
        if "_uses_horizon" not in self.__dict__:
            self._horizon, self._horizon_warned = None, False
            self._uses_horizon = any(cfg.trace == AUTO_TRACE for cfg in self.levels)
        if "_learned_start" not in self.__dict__:
            self._learned_start = learned_group_values(self) if self._tower_state is not None else {}

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults, state and param_groups, which would lose the tower on
        # copy.deepcopy or pickling. Buckets (views into flat tangent buffers) are rebuilt from the
        # state on the next step; a process group cannot be pickled.
        state = dict(self.__dict__)
        state.update(_buckets=None, _bucket_key=None, _sharding_group=None)
        return state

    # ------------------------------------------------------------------ tower state
    def _units(self) -> int:
        if self.scope == "shared":
            return 1
        if self.scope == "group":
            return len(self.param_groups)
        return self._n_params()

    def _n_params(self) -> int:
        return sum(len(g["params"]) for g in self.param_groups)

    @property
    def _held(self) -> dict[str, str]:
        """The weight level's learned names whose tangents its rule holds in its state (``Rule.held_tangents``)."""
        rule = self._rules[0]
        return rule.held_tangents(self._learn[0]) if self.height and rule.writes_tangents else {}

    def _ramped(self) -> bool:
        return self.height > 0 and bool(self.levels[1].ramp)

    def _upper_state_names(self, k: int) -> tuple[str, ...]:
        """The names of the state level ``k >= 1`` keeps (its rule's, as its initial values need them)."""
        return tuple(self._rules[k].init_state(torch.zeros(1), self.levels[k].full_values()))

    def _how(self, k: int, name: str):
        return parametrisation(type(self._rules[k]), name, self.mode)

    def _level0_unit_values(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for name in self._learn[0]:
            # The learned lr starts from the schedule's base: a scheduler (a warm-up, or
            # torch.distributed.checkpoint's zero-lr initialising step) may already have changed group["lr"].
            per_group = [
                self.schedule_base(i) if name == "lr" else group_value(g, name) for i, g in enumerate(self.param_groups)
            ]
            if self.scope == "shared":
                out[name] = per_group[:1]
            elif self.scope == "group":
                out[name] = per_group
            else:
                out[name] = [v for g, v in zip(self.param_groups, per_group, strict=False) for _ in g["params"]]
        return out

    def _hyper_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    def _param_values(self, p: Tensor) -> dict[str, float]:
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                return {n: group_value(g, n) for n in self._rules[0].hyperparameters}
        raise KeyError("parameter not in any group")

    # ------------------------------------------------------------------ the step
    # Under torch.compile the step runs eagerly, behind one graph break: it is driven from the host
    # (step counts, bucket caches, Python floats read from CPU hyperparameters for the fast _foreach
    # overloads, forward-mode dual levels), so Dynamo would break the graph at every one of those, and
    # across the breaks it lost the step's changes to the optimizer's attributes (the first compiled
    # step failed on buckets it had just built). Run eagerly, it is the step the tests check.
    @torch.compiler.disable(reason="the tower's step is host-driven; it runs eagerly behind one graph break")
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """Take one step of every level (top first), then of the weights.

        Under ``torch.compile`` the step runs eagerly (one graph break), as it does outside.

        Args:
            closure: reevaluates the model and returns the loss, as in ``torch.optim``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = collect(self)
        if not entries:
            return loss
        key = tuple(id(e[0]) for e in entries)
        if self._buckets is None or key != self._bucket_key:
            zero_idle_tangents(self, entries)
            self._buckets = build_buckets(self, entries)
            self._bucket_key = key
            self._sharding_group = sharding_group([e[0] for e in entries])
        if self._uses_horizon and self._horizon is None and not self._horizon_warned:
            # Also after load_state_dict: the horizon is the run's, not saved with the tower.
            self._horizon_warned = True
            warnings.warn(
                f"{type(self).__name__}: trace=auto spans one pass through the training data, and no horizon "
                f"was set: it spans {AUTO_TRACE_STEPS} steps; call set_horizon(steps per epoch) before the "
                "first step, and again after loading a state dict (the Trainer integration does)",
                stacklevel=5,  # the caller of step(), past no_grad's, compiler.disable's and torch.optim's wrappers
            )
        if self._tower_state is None:
            # The learned values start here, the lr from its schedule base (group["lr"] may be a warm-up's 0 by
            # now), the rest from the groups as they are: checked again. From now on the base is fixed, and it
            # travels in the state dict as the scheduler's own (a scheduler made later takes it, as torch's).
            self._check_level0_values([n for n in self._learn[0] if n != "lr"] if self.height else ())
            check_schedule_bases(self)
            for i, group in enumerate(self.param_groups):
                group.setdefault("initial_lr", self._built_lrs[i])
            first = local_tensor(entries[0][0])
            self._tower_state = initial_state(self, first.device, self._hyper_dtype(first.dtype))
            self._learned_start = learned_group_values(self)
        check_learned_unwritten(self, self._learned_start)
        ts = self._tower_state
        with rollback_on_error(self):  # a step that raises leaves the learned values as they were
            count_step(self, ts)
            hypergrads, skip_masks = hypergradients(self, ts)
            step_upper_levels(self, ts, hypergrads, skip_masks)
            step_weights(self, ts)
            if ts.ramp is not None and not ts.ramp.sized:
                measure_ramp(self, ts)
        return loss

    # ------------------------------------------------------------------ reading the tower
    @torch.no_grad()
    def hyperparameters(self, given: bool = False) -> list[dict[str, float | list[float]]]:
        """Every level's learned hyperparameters in natural units, bottom level first.

        Level 0 values are floats in the shared scope and lists (one per group, or per tensor) in the
        other scopes; levels above hold one float each. The top level reports its fixed values of the
        hyperparameters it would learn (``lr`` by default).

        A ramped ``lr`` is reported as the weights use it: before the first step, the probe step's
        (a millionth of the lr given). ``given=True`` reports, before the first step, the values the
        tower was given instead (what a model card calls the start).
        """
        out: list[dict[str, float | list[float]]] = []
        n = len(self.levels)
        for k in range(n):
            rule = self._rules[k]
            entry: dict[str, float | list[float]] = {}
            if k < n - 1:
                names = self._learn[k]
                if self._tower_state is not None:
                    theta = self._tower_state.theta[k].detach().double().cpu()
                    units = theta.numel() // len(names)
                    for j, name in enumerate(names):
                        nat = to_natural(theta[j * units : (j + 1) * units], self._how(k, name))
                        if k == 0 and name == "lr" and self._ramped():  # the lr the weights use
                            nat = nat * self._tower_state.ramp.factor.detach().double().cpu()
                        vals = nat.tolist()
                        entry[name] = vals[0] if (k > 0 or self.scope == "shared") else vals
                else:
                    for name in names:
                        if k == 0:
                            vals = self._level0_unit_values()[name]
                            if name == "lr" and self._ramped() and not given:
                                vals = [v * RAMP_PROBE for v in vals]
                            entry[name] = vals[0] if self.scope == "shared" else vals
                        else:
                            entry[name] = self.levels[k].full_values()[name]
            else:
                values = (
                    self.levels[k].full_values()
                    if k > 0
                    else {n_: group_value(self.param_groups[0], n_) for n_ in rule.hyperparameters}
                )
                learn = self.levels[k].learn or ("lr",)
                for name in learn:
                    entry[name] = values[name]
            out.append(entry)
        return out

    def skipped_hyper_updates(self) -> list[int]:
        """For each learned level, how many updates of its learned values were skipped as non-finite: one
        per value and step (a step skipped for ``learn=lr+beta1`` counts 2; with ``scope="tensor"``, one
        per tensor), so a count is 0 exactly when every update was taken."""
        if self._tower_state is None:
            return [0] * max(self.height, 1)
        return [int(x) for x in self._tower_state.skipped.tolist()]

    # ------------------------------------------------------------------ checkpoints
    def _identity(self) -> dict[str, str]:
        """What a saved tower must match to load: its spec, scope and mode (these fix what it learns)."""
        return {"spec": self.spec, "scope": self.scope, "mode": self.mode}

    def _same_levels(self, spec: str) -> bool:
        """Whether ``spec`` describes this tower's levels, however it is written: ``adam/sgd(lr=1e-05)``,
        ``adam(lr=0.001)/sgd(lr=1e-5)`` and ``adam(learn=lr)/sgd(lr=1e-05)`` are one tower (defaults
        written out or left out, ``learn=`` given as its default)."""
        from .spec import parse_spec  # spec.py builds optimizers of this module

        try:
            levels = parse_spec(spec)
            return len(levels) == len(self.levels) and all(
                self._canonical(k, a) == self._canonical(k, b)
                for k, (a, b) in enumerate(zip(levels, self.levels, strict=True))
            )
        except ValueError:  # not a spec, or not one that could build a tower
            return False

    def _spec_difference(self, spec: str) -> str:
        """Level by level, how the tower ``spec`` describes differs from this one, e.g. ``level 0 (adam):
        lr=0.001 saved, 0.0005 here``; empty where ``spec`` cannot be read as a tower of this mode."""
        from .spec import parse_spec  # spec.py builds optimizers of this module

        try:
            saved = [self._canonical(k, cfg) for k, cfg in enumerate(parse_spec(spec))]
            here = [self._canonical(k, cfg) for k, cfg in enumerate(self.levels)]
        except ValueError:
            return ""
        if len(saved) != len(here):
            return f"{len(saved)} level{'s' * (len(saved) != 1)} saved, {len(here)} here"
        out = []
        for k, (a, b) in enumerate(zip(saved, here, strict=True)):
            if a == b:
                continue
            if a[0] != b[0]:
                out.append(f"level {k}: {a[0]} saved, {b[0]} here")
                continue
            values_a, values_b = dict(a[1]), dict(b[1])
            parts = [
                f"{n}={values_a[n]:.10g} saved, {values_b[n]:.10g} here" for n in values_b if values_a[n] != values_b[n]
            ]
            if a[2] != b[2]:
                parts.append(f"learn={'+'.join(a[2])} saved, {'+'.join(b[2])} here")
            parts += [
                f"{n}={x!r} saved, {y!r} here" for n, x, y in zip(LEVEL_OPTIONS, a[3], b[3], strict=True) if x != y
            ]
            out.append(f"level {k} ({b[0]}): " + ", ".join(parts))
        return "; ".join(out)

    def _canonical(self, k: int, cfg: LevelConfig) -> tuple:
        values = cfg.full_values()
        learn = resolve_learn(k, cfg, values, top=k == len(self.levels) - 1, mode=self.mode)
        options = tuple(getattr(cfg, name) for name in LEVEL_OPTIONS)
        return cfg.rule.name, tuple(sorted(values.items())), tuple(sorted(learn)), options

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state dict, with the tower's state in the first param group (:mod:`.state`)."""
        sd = super().state_dict()
        # Sharded (DTensor) state must own its storage to be saved; tangents are views of a flat buffer.
        sd["state"] = {i: {k: standalone(v) for k, v in s.items()} for i, s in sd["state"].items()}
        # torch.distributed.checkpoint (FSDP2 checkpoints, Accelerate, the Trainer) keeps only "state" and
        # "param_groups": the tower rides in the first group, flat, so that all of it survives.
        sd["param_groups"][0][TOWER_GROUP_KEY] = tower_entry(self._identity(), self._tower_state)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this tower (or one written by hf_hyperopt 0.1.0), checked before anything changes."""
        found = read_tower_entry(state_dict)
        if found is None:
            raise ValueError(
                f"this state_dict has no 'tower' entry (param_groups[0][{TOWER_GROUP_KEY!r}]): it was not saved by an "
                f"hf_hyperopt tower optimizer (expected one from {self.spec!r})"
            )
        identity, entries = found
        for key, value in self._identity().items():
            if identity[key] != value and not (key == "spec" and self._same_levels(identity[key])):
                # The usual cause: the run was started with another tower (an earlier default, say); the
                # saved spec is the one that loads it.
                how = {
                    "spec": "build this optimizer with that spec (hyper=/hyper_tower= for the levels above the weights)",
                    "scope": "build this optimizer with that scope",
                    "mode": "build this optimizer without compat"
                    if identity[key] == "default"
                    else f"build this optimizer with compat={identity[key]!r}",
                }[key]
                # What differs first: the message may be cut short where it is quoted (a Trainer's resume).
                differs = self._spec_difference(identity[key]) if key == "spec" else ""
                raise DifferentTowerError(
                    f"state_dict is from a different tower{f' ({differs})' if differs else ''}: its {key} is "
                    f"{identity[key]!r}, this optimizer's is {value!r}; to load it, {how}"
                )
        groups = state_dict.get("param_groups") or [{}]
        state_dict = {k: v for k, v in state_dict.items() if k != "tower"}  # 0.1.0 also wrote it there
        state_dict["param_groups"] = [{k: v for k, v in g.items() if k != TOWER_GROUP_KEY} for g in groups]
        tower_state = checked_tower_state(self, state_dict, entries)  # raises before anything changes
        # torch.optim casts every floating state entry to its parameter's dtype: a held tangent's constant
        # keeps the tower's (float32 at least, as bf16 would round it), so it is set aside and put back.
        saved = state_dict.get("state") or {}
        constants = {i: {k: v for k, v in s.items() if k.startswith(SCALE_PREFIX)} for i, s in saved.items()}
        state_dict["state"] = {i: {k: v for k, v in s.items() if k not in constants[i]} for i, s in saved.items()}
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, p in zip(ids, (p for g in self.param_groups for p in g["params"]), strict=True):
            for key, value in constants.get(i, {}).items():
                local = local_tensor(p)
                self.state[p][key] = value.detach().to(
                    device=local.device, dtype=self._hyper_dtype(local.dtype), copy=True
                )
        hold_saved_tangents(self)
        self._tower_state = tower_state
        self._learned_start = learned_group_values(self)
        self._buckets = None  # tangent views are rebuilt on the next step
