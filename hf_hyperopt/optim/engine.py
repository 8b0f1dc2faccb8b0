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
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..levels.base import MODES, Hyper, Mode, Rule, parametrisation, raw_bounds, to_natural, to_raw
from .checks import checked_tower_state
from .distributed import (
    TOWER_GROUP_KEY,
    keep_empty,
    local_tensor,
    reduce_hypergradients,
    restore_empty,
    sharding_group,
    standalone,
    wrap_like,
)
from .ramp import RAMP_PROBE, advance_ramp, init_ramp, size_ramp, validate_ramp
from .rollback import rollback_on_error
from .tangents import run_rule

SCOPES: tuple[str, ...] = ("shared", "group", "tensor")
_TANGENT = "hypertangent_"


@dataclass
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
            hypergradient; values near 1 sum the signal over about ``1 / (1 - mu)`` steps.
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
    """

    rule: type[Rule]
    values: dict[str, float] = field(default_factory=dict)
    learn: tuple[str, ...] | None = None
    trace: float = 0.0
    ramp: float = 0.0
    normalize: bool = False

    def full_values(self) -> dict[str, float]:
        return {name: float(self.values.get(name, spec.default)) for name, spec in self.rule.hyperparameters.items()}

    def to_spec(self) -> str:
        """This level in spec-string form, e.g. ``adam(lr=0.001,beta1=0.8,learn=lr+beta1)``."""
        parts = [f"{k}={_fmt(v, self.rule.hyperparameters[k].kind)}" for k, v in self.values.items()]
        if self.learn is not None:
            parts.append("learn=" + "+".join(self.learn))
        if self.trace:
            parts.append(f"trace={self.trace!r}")
        if self.ramp:
            parts.append(f"ramp={self.ramp!r}")
        if self.normalize:
            parts.append("normalize=true")
        return f"{self.rule.name}({','.join(parts)})" if parts else self.rule.name


def _fmt(v: float, kind: str) -> str:
    if kind == "flag":
        return "true" if v else "false"
    return repr(float(v))


def validate_value(level: int, rule: type[Rule], name: str, value: float) -> None:
    """Raise ``ValueError`` naming the level, the hyperparameter and the allowed range."""
    spec = rule.hyperparameters[name]
    if not math.isfinite(value):
        raise ValueError(f"level {level} ({rule.name}): {name}={value!r} is not finite")
    if spec.kind == "step" and value < 0:
        raise ValueError(f"level {level} ({rule.name}): {name}={value!r} is negative; {name} must be >= 0")
    if spec.kind == "unit" and not 0.0 <= value < 1.0:
        raise ValueError(f"level {level} ({rule.name}): {name}={value!r} is outside [0, 1)")


def validate_level_options(
    level: int, name: str, trace: float, ramp: float, normalize: bool, *, placed: bool = True
) -> None:
    """Raise ``ValueError`` for a level option out of range or on a level where it means nothing.

    ``trace`` (a decay in ``[0, 1)``) and ``normalize`` shape the hypergradient a level learns from,
    so they belong to a level above the weights; ``ramp`` is checked by :func:`.ramp.validate_ramp`.
    The spec parser checks the ranges (``placed=False``: a ``hyper=`` spec is parsed on its own, so
    its first level is not the weights'); the tower's constructor, which knows each level's place,
    checks both.
    """
    if not (isinstance(trace, (int, float)) and math.isfinite(trace) and 0.0 <= trace < 1.0):
        raise ValueError(f"level {level} ({name}): trace={trace!r} is outside [0, 1)")
    if placed and level == 0:
        for key, value in (("trace", trace), ("normalize", normalize)):
            if value:
                shown = "true" if value is True else repr(value)
                raise ValueError(
                    f"level 0 ({name}): {key}={shown} belongs to a level above the weights (it shapes the "
                    "hypergradient that level learns from); move it to level 1"
                )
    validate_ramp(level, name, ramp, placed=placed)


def _aliases(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Contiguous tensors shaped like ``like`` that share ``flat``'s storage, one after another.

    They are made with ``set_`` rather than as views: forward-mode AD then treats each as a tensor
    of its own, so a rule may build a direction that carries a tangent in them (a view of a base
    without a tangent cannot take one).
    """
    out, offset = [], flat.storage_offset()
    for t in like:
        out.append(flat.new_empty(0).set_(flat.untyped_storage(), offset, t.shape))
        offset += t.numel()
    return out


class _Bucket:
    """The weight-level tensors of one (device, dtype), with index tensors and flat tangent storage.

    ``positions`` are the tensors' places in the optimizer's parameter list (every group's params,
    in order): where their step counts are kept.
    """

    def __init__(
        self, params: list[Tensor], units: list[int], groups: list[int], positions: list[int], learn: tuple[str, ...]
    ):
        self.params = params
        self.positions = positions
        self.local = [local_tensor(p) for p in params]
        device = self.local[0].device
        self.unit_index = torch.tensor(units, device=device)
        self.group_index = torch.tensor(groups, device=device)
        # Units are contiguous runs of tensors (params are kept in group order), so per-unit sums are
        # sums over slices of the flat buffer.
        self.unit_ids, counts = torch.unique_consecutive(torch.tensor(units), return_counts=True)
        numels = torch.tensor([t.numel() for t in self.local])
        self.unit_numels = [int(c.sum()) for c in numels.split(counts.tolist())]
        self.numels = numels
        self.learn = learn
        self.flat: dict[str, Tensor] = {}
        self.views: dict[str, list[Tensor]] = {}
        self.work: dict[str, list[Tensor]] = {}

    def attach_tangents(self, state: dict) -> None:
        """Move each parameter's tangent buffers into one flat buffer per learned name (views stay in state)."""
        total = sum(t.numel() for t in self.local)
        for name in self.learn:
            key = _TANGENT + name
            flat = torch.empty(total, dtype=self.local[0].dtype, device=self.local[0].device)
            views = _aliases(flat, self.local)
            old = [
                local_tensor(state[p][key]) if key in state[p] else torch.zeros_like(t)
                for p, t in zip(self.params, self.local, strict=False)
            ]
            torch._foreach_copy_(views, old)
            for p, v in zip(self.params, views, strict=False):
                state[p][key] = wrap_like(p, v)
            self.flat[name], self.views[name] = flat, views

    def unit_sums(self, flat: Tensor, dtype: torch.dtype, per_tensor_units: bool) -> Tensor:
        if per_tensor_units:
            return torch.segment_reduce(flat.to(dtype), "sum", lengths=self.numels.to(flat.device))
        return torch.stack([chunk.sum(dtype=dtype) for chunk in flat.split(self.unit_numels)])


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
            for name, v in values.items():
                validate_value(k, cfg.rule, name, v)
            validate_level_options(k, cfg.rule.name, cfg.trace, cfg.ramp, cfg.normalize)
            self._learn.append(self._resolve_learn(k, cfg, values))
            options: dict[str, bool] = {"nesterov": bool(values.get("nesterov", 0.0))}
            if "momentum" in self._learn[k]:
                options["learn_momentum"] = True
            if mode == "gdtuo":
                options.update(gdtuo_init=True, eps_in_sqrt=True)
            self._rules.append(cfg.rule(mode, **options))
        if levels[0].values.get("nesterov") and levels[0].full_values()["momentum"] == 0.0:
            raise ValueError("level 0 (sgd): nesterov=true needs momentum > 0")
        super().__init__(params, _group_defaults(levels[0]))
        for group in self.param_groups:
            for name in self._rules[0].hyperparameters:
                validate_value(0, levels[0].rule, name, _group_value(group, name))
            group.setdefault("initial_lr", group["lr"])
        if self._ramped() and "lr" not in self._learn[0]:
            raise ValueError(
                f"level 1 ({self._rules[1].name}): ramp={levels[1].ramp!r} ramps the weights' learned lr, but "
                f"level 0 learns {'+'.join(self._learn[0])}; add lr to its learn= or drop the ramp"
            )
        self._check_scope()
        self._check_sharding()
        self._buckets: list[_Bucket] | None = None
        self._bucket_key: tuple[int, ...] | None = None
        self._tower_state: dict[str, Any] = {}
        self._sharding_group: Any = None

    # ------------------------------------------------------------------ construction helpers
    def _check_sharding(self) -> None:
        """Refuse, before any step, trainable parameters sharded in ways no single reduction can sum."""
        sharding_group([p for g in self.param_groups for p in g["params"] if p.requires_grad])

    def _resolve_learn(self, k: int, cfg: LevelConfig, values: dict[str, float]) -> tuple[str, ...]:
        top = k == len(self.levels) - 1
        if cfg.learn is not None and top:
            raise ValueError(
                f"level {k} ({cfg.rule.name}) is the top of the tower, so nothing learns its "
                f"hyperparameters: drop learn={'+'.join(cfg.learn)} or add a level above it"
            )
        if top:
            return ()
        learn = (
            cfg.learn
            if cfg.learn is not None
            else (cfg.rule(self.mode).gdtuo_learned(values) if self.mode == "gdtuo" else ("lr",))
        )
        try:
            return cfg.rule.check_learn(learn)
        except ValueError as err:
            raise ValueError(f"level {k} ({cfg.rule.name}): {err}") from None

    def _check_scope(self) -> None:
        for name in self._learn[0] if len(self.levels) > 1 else ():
            kind = self._rules[0].hyperparameters[name].kind
            vals = [_group_value(g, name) for g in self.param_groups]
            if self.scope == "shared" and len(set(vals)) > 1:
                raise ValueError(
                    f"scope='shared' learns one {name} for all param groups, but the groups start at "
                    f"{vals}; use scope='group' or start them equal"
                )
            if self.mode == "default":
                for v in vals:
                    if kind == "step" and v <= 0 or kind == "unit" and v <= 0:
                        raise ValueError(
                            f"level 0 ({self._rules[0].name}): cannot learn {name}={v!r}: the default mode "
                            f"learns it as a {'logarithm' if kind == 'step' else 'logit'}, so it must start > 0"
                        )
        for k in range(1, len(self.levels) - 1):
            values = self.levels[k].full_values()
            for name in self._learn[k]:
                if self.mode == "default" and values[name] <= 0:
                    raise ValueError(
                        f"level {k} ({self._rules[k].name}): cannot learn {name}={values[name]!r}: the default mode "
                        "learns it on a log/logit scale, so it must start > 0"
                    )

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
        started = bool(getattr(self, "_tower_state", None))
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
                for name in self._rules[0].hyperparameters:
                    validate_value(0, self.levels[0].rule, name, _group_value(group, name))
                group.setdefault("initial_lr", group["lr"])
                self._check_scope()
                self._check_sharding()
                self._buckets = None
        except ValueError:
            self.param_groups.pop()
            raise
        if started:  # the new tensors have taken no step yet, as in torch.optim
            counts = self._tower_state["step"]
            counts[0] = [*counts[0], *[0] * len(group["params"])]

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

    def _init_tower_state(self, device: torch.device, dtype: torch.dtype) -> None:
        """theta[k]: raw learned hyperparameters of level k; upper[k]: state of level k >= 1."""
        ts = self._tower_state
        n = len(self.levels)
        thetas, uppers, tangents = [], [], []
        for k in range(n - 1):
            if k == 0:
                per_unit = self._level0_unit_values()
                raw = [
                    to_raw(per_unit[name][u], self._how(k, name))
                    for name in self._learn[0]
                    for u in range(self._units())
                ]
            else:
                values = self.levels[k].full_values()
                raw = [to_raw(values[name], self._how(k, name)) for name in self._learn[k]]
            thetas.append(torch.tensor(raw, dtype=dtype, device=device))
        for k in range(1, n):
            values = self.levels[k].full_values()
            uppers.append(self._rules[k].init_state(thetas[k - 1], values))
            tangents.append({name: torch.zeros_like(thetas[k - 1]) for name in self._learn[k]})
        ts["theta"] = thetas
        ts["upper_state"] = uppers
        ts["upper_tangent"] = tangents
        # Host-side step counts, so that bias corrections need no device read. The weight level keeps
        # one per parameter tensor (in param_groups order), counting the steps in which it had a gradient,
        # as torch.optim counts state[p]["step"]; every level above steps once per step.
        ts["step"] = [[0] * self._n_params(), *[0] * (n - 1)]
        ts["skipped"] = torch.zeros(max(n - 1, 1), dtype=torch.int64, device=device)
        if self._ramped():
            init_ramp(ts, dtype, device)
        ts["spec"] = self.spec
        ts["scope"] = self.scope
        ts["mode"] = self.mode

    def _ramped(self) -> bool:
        return self.height > 0 and bool(self.levels[1].ramp)

    def _ramp_factor(self, ts: dict) -> Tensor | None:
        """The ramp's current factor on the weights' learned lr (a 1-element tensor), or None."""
        return ts.get("ramp") if self._ramped() else None

    def _how(self, k: int, name: str):
        return parametrisation(type(self._rules[k]), name, self.mode)

    def _level0_unit_values(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for name in self._learn[0]:
            # The learned lr starts from the group's initial lr: a scheduler (a warm-up, or
            # torch.distributed.checkpoint's zero-lr initialising step) may already have changed group["lr"].
            per_group = [
                float(g.get("initial_lr", g["lr"])) if name == "lr" else _group_value(g, name)
                for g in self.param_groups
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

    # ------------------------------------------------------------------ buckets
    def _collect(self) -> list[tuple[Tensor, int, int, int]]:
        """(param, unit, group, position) for every parameter that has a gradient this step."""
        out, offset = [], 0
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError(
                            f"{type(self).__name__} does not support sparse gradients (a parameter of shape "
                            f"{tuple(p.shape)} has one); use a dense layer, e.g. nn.Embedding(..., sparse=False)"
                        )
                    unit = 0 if self.scope == "shared" else gi if self.scope == "group" else offset + pi
                    out.append((p, unit, gi, offset + pi))
            offset += len(group["params"])
        return out

    def _zero_idle_tangents(self, entries: list[tuple[Tensor, int, int, int]]) -> None:
        """Clear the tangents of parameters that have no gradient this step.

        Such a parameter does not move, so its tangent dw_{t+1}/dtheta_t is zero; the one it kept from
        its last step would otherwise be dotted with its next gradient. Only called when the set of
        parameters with gradients changes, so the usual step pays nothing.
        """
        active = {id(e[0]) for e in entries}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in active and p in self.state:
                    for key, buf in self.state[p].items():
                        if key.startswith(_TANGENT):
                            buf.zero_()

    def _build_buckets(self, entries: list[tuple[Tensor, int, int, int]]) -> list[_Bucket]:
        by_key: dict[tuple, list[tuple[Tensor, int, int, int]]] = defaultdict(list)
        for e in entries:
            t = local_tensor(e[0])
            by_key[(t.device, t.dtype)].append(e)
        learn0 = self._learn[0] if self.height else ()
        buckets = []
        for items in by_key.values():
            params, units, groups, positions = (list(column) for column in zip(*items, strict=True))
            b = _Bucket(params, units, groups, positions, learn0)
            for p, t in zip(b.params, b.local, strict=False):
                st = self.state[p]
                if not any(n in st for n in self._rules[0].state_names):
                    values = self._param_values(p)
                    for name, buf in self._rules[0].init_state(t, values).items():
                        st[name] = wrap_like(p, buf)
            b.attach_tangents(self.state)
            rule0 = self._rules[0]
            if not learn0 or rule0.writes_tangents:
                # A learned lr's tangent buffer is the direction's workspace (a rule run by forward AD
                # works in the tangent buffers of each learned name instead: tangents.forward_ad).
                kept = ("direction",) if "lr" in learn0 else ()
                b.work = {n: [torch.empty_like(t) for t in b.local] for n in rule0.workspace_names if n not in kept}
            buckets.append(b)
        self._sharding_group = sharding_group([e[0] for e in entries])
        return buckets

    def _param_values(self, p: Tensor) -> dict[str, float]:
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                return {n: _group_value(g, n) for n in self._rules[0].hyperparameters}
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
        entries = self._collect()
        if not entries:
            return loss
        key = tuple(id(e[0]) for e in entries)
        if self._buckets is None or key != self._bucket_key:
            self._zero_idle_tangents(entries)
            self._buckets = self._build_buckets(entries)
            self._bucket_key = key
        first = local_tensor(entries[0][0])
        if not self._tower_state:
            self._init_tower_state(first.device, self._hyper_dtype(first.dtype))
        ts = self._tower_state
        with rollback_on_error(self):  # a step that raises leaves the learned values as they were
            self._count_step(ts)
            hypergrads = self._hypergradients(ts)
            self._step_upper_levels(ts, hypergrads)
            self._step_weights(ts)
            if self._ramped() and not ts["ramp_sized"]:
                self._size_ramp(ts)
        return loss

    def _count_step(self, ts: dict) -> None:
        """One more step for every level above the weights and for each tensor that has a gradient.

        New lists rather than in-place increments, so that :func:`.rollback.rollback_on_error`'s copy of
        the old ones stays as it was.
        """
        counts = list(ts["step"][0])
        for b in self._buckets:
            for i in b.positions:
                counts[i] += 1
        ts["step"] = [counts, *[s + 1 for s in ts["step"][1:]]]

    def _weight_steps(self, ts: dict, b: _Bucket) -> int | Tensor:
        """The step counts of a bucket's tensors: one int when they agree (the usual case), else one per tensor."""
        counts = [ts["step"][0][i] for i in b.positions]
        if all(c == counts[0] for c in counts):
            return counts[0]
        dtype, device = _constant_dtype_device(b.local[0])
        return torch.tensor(counts, dtype=dtype, device=device)

    def _hypergradients(self, ts: dict) -> list[Tensor]:
        """h[k] = dL/dtheta[k] for every level that has learned hyperparameters, bottom-up, guarded."""
        n = len(self.levels)
        hyper: list[Tensor] = []
        if n == 1:
            return hyper
        theta0 = ts["theta"][0]
        units = self._units()
        h0 = torch.zeros_like(theta0)
        trace = bool(self.levels[1].trace)
        normalize = self.levels[1].normalize
        if normalize:
            zz0 = torch.zeros_like(theta0)
        for b in self._buckets:
            grads = [local_tensor(p.grad) for p in b.params]
            # A trace lives on across steps, so it is read without being overwritten; on the CPU a dot
            # per tensor is also the cheaper read (the buffer once, no write), on an accelerator the
            # fused product and one flat sum are two kernels instead of one per tensor.
            keep = trace or b.local[0].device.type == "cpu"
            for j, name in enumerate(self._learn[0]):
                if normalize:
                    zsq = _squared_norms(b.views[name])
                    zz0.index_add_(0, b.unit_index.to(theta0.device) + j * units, zsq.to(theta0.device, theta0.dtype))
                if keep:
                    sums = torch.stack([_dot(z, g) for z, g in zip(b.views[name], grads, strict=True)])
                    ids = b.unit_index
                else:
                    torch._foreach_mul_(b.views[name], grads)
                    sums = b.unit_sums(b.flat[name], theta0.dtype, self.scope == "tensor")
                    ids = b.unit_index if self.scope == "tensor" else b.unit_ids
                h0.index_add_(0, ids.to(theta0.device) + j * units, sums.to(theta0.device, theta0.dtype))
        if normalize:  # one reduction for both sums
            both = torch.cat([h0, zz0])
            reduce_hypergradients(both, self._sharding_group)
            h0, zz0 = both.split([h0.numel(), zz0.numel()])
        else:
            reduce_hypergradients(h0, self._sharding_group)
        held = self._advance_ramp(ts, h0, units)
        raw = h0  # the true hypergradient: what the levels above chain through
        if normalize:
            h0 = _per_length(h0, zz0)
        self._nonfinite = {}
        hyper.append(self._guard(h0, ts, 0))
        if held is not None:
            self._nonfinite[0] = self._nonfinite[0] | held
        for k in range(1, n - 1):
            tangent = ts["upper_tangent"][k - 1]
            # From the unguarded level below: a hypergradient built on a non-finite one is skipped too.
            raw_below = raw
            raw = torch.stack([torch.dot(raw_below, tangent[name]) for name in self._learn[k]])
            h = raw
            if self.levels[k + 1].normalize:
                h = _per_length(raw, torch.stack([tangent[n].dot(tangent[n]) for n in self._learn[k]]))
            hyper.append(self._guard(h, ts, k))
        return hyper

    def _size_ramp(self, ts: dict) -> None:
        """After the probe step: two norms, once (see :mod:`.ramp`).

        The weights' norm is taken before the probe (the weights less its increment, the lr's tangent),
        one tensor at a time, so that weights that started at zero read as zero.
        """
        sq = torch.zeros(2, dtype=torch.float64, device=ts["ramp"].device)
        for b in self._buckets:
            for w, d in zip(b.local, b.views["lr"], strict=True):
                sq[0] += (w - d).square().sum().to(sq.device, sq.dtype)
            sq[1] += _squared_norms(b.views["lr"]).sum().to(sq.device, sq.dtype)
        reduce_hypergradients(sq, self._sharding_group)
        size_ramp(ts, self.levels[1].ramp, sq[0], sq[1])

    def _advance_ramp(self, ts: dict, h0: Tensor, units: int) -> Tensor | None:
        """The coordinates of theta[0] the level above leaves alone this step (the lr's, while the ramp
        searches), or None without a ramp."""
        if self._ramp_factor(ts) is None:
            return None
        j = self._learn[0].index("lr")
        held = torch.zeros_like(h0, dtype=torch.bool)
        held[j * units : (j + 1) * units] = advance_ramp(ts, h0.device)
        return held

    def _guard(self, h: Tensor, ts: dict, k: int) -> Tensor:
        finite = torch.isfinite(h)
        ts["skipped"][k].add_((~finite).sum())
        self._nonfinite[k] = ~finite
        return torch.where(finite, h, torch.zeros_like(h))

    def _step_upper_levels(self, ts: dict, hypergrads: list[Tensor]) -> None:
        n = len(self.levels)
        for k in range(n - 1, 0, -1):
            theta = ts["theta"][k - 1]
            old = theta.clone()
            old_state = {name: v.clone() for name, v in ts["upper_state"][k - 1].items()}
            hp_fn = self._upper_hyper_fn(ts, k)
            tangents = {name: [torch.empty_like(theta)] for name in self._learn[k]}
            run_rule(
                self._rules[k],
                [theta],
                [hypergrads[k - 1]],
                {n_: [v] for n_, v in ts["upper_state"][k - 1].items()},
                {n_: [torch.empty_like(theta)] for n_ in self._rules[k].workspace_names} if k == n - 1 else {},
                hp_fn,
                ts["step"][k],
                ts["theta"][k] if k < n - 1 else None,
                self._learn[k],
                tangents,
            )
            # The level above (k + 1) may learn from a trace of these tangents.
            trace = self.levels[k + 1].trace if k + 1 < n else 0.0
            kept = ts["upper_tangent"][k - 1]
            for name, tangent in tangents.items():
                kept[name] = trace * kept[name] + tangent[0] if trace else tangent[0]
            self._keep_skipped(ts, k - 1, old, old_state)
            self._bound(theta, old, k - 1, ts)

    def _keep_skipped(self, ts: dict, k: int, old: Tensor, old_state: dict[str, Tensor]) -> None:
        """Undo this step's update of theta[k] where its hypergradient was skipped as non-finite.

        The zero that stands in for such a hypergradient is not enough: an adaptive level (Adam,
        RMSProp) would still move the value on its momentum and decay its moments with a gradient it
        never saw. The coordinate keeps its value and its state, and its tangent is zero (it did not
        move). Elementwise ``where`` on vectors of hyperparameters: no device read.
        """
        bad = self._nonfinite[k]
        theta = ts["theta"][k]
        theta.copy_(torch.where(bad, old, theta))
        for name, v in ts["upper_state"][k].items():
            v.copy_(torch.where(bad, old_state[name], v))
        tangents = ts["upper_tangent"][k]
        for name, t in tangents.items():
            tangents[name] = torch.where(bad, torch.zeros_like(t), t)

    def _bound(self, theta: Tensor, old: Tensor, k: int, ts: dict) -> None:
        """Keep the learned coordinates of level k finite (and, by default, inside their bounds)."""
        finite = torch.isfinite(theta)
        ts["skipped"][k].add_((~finite).sum())
        theta.copy_(torch.where(finite, theta, old))
        if self.mode == "default":
            units = len(theta) // len(self._learn[k])
            for j, name in enumerate(self._learn[k]):
                lo, hi = raw_bounds(self._rules[k].hyperparameters[name].kind)
                theta[j * units : (j + 1) * units].clamp_(lo, hi)

    def _upper_hyper_fn(self, ts: dict, k: int) -> Callable[[Tensor | None], Hyper]:
        """Hyperparameters of upper level k (one tensor), as a function of its possibly-dual theta."""
        values = self.levels[k].full_values()
        rule = self._rules[k]
        theta_ref = ts["theta"][k] if k < len(self.levels) - 1 else None
        dtype, device = _constant_dtype_device(ts["theta"][k - 1])
        zero = frozenset(n for n, v in values.items() if v == 0.0 and n not in self._learn[k])

        def build(theta: Tensor | None) -> Hyper:
            out = {}
            for name, spec in rule.hyperparameters.items():
                if spec.kind == "flag":
                    continue
                if name in self._learn[k]:
                    j = self._learn[k].index(name)
                    out[name] = to_natural((theta if theta is not None else theta_ref)[j : j + 1], self._how(k, name))
                else:
                    out[name] = torch.full((1,), values[name], dtype=dtype, device=device)
            return Hyper(out, zero)

        return build

    def _level0_hyper_fn(self, ts: dict, b: _Bucket) -> Callable[[Tensor | None], Hyper]:
        rule = self._rules[0]
        learn = self._learn[0] if self.height else ()
        units = self._units()
        device = b.local[0].device
        dtype, _ = _constant_dtype_device(b.local[0])
        groups = self.param_groups
        unit_index = b.unit_index
        group_index = b.group_index
        zero = frozenset(
            n
            for n, s in rule.hyperparameters.items()
            if n not in learn and s.kind != "flag" and all(_group_value(g, n) == 0.0 for g in groups)
        )

        def build(theta: Tensor | None) -> Hyper:
            if theta is None and learn:  # a tower of height 0 learns nothing and has no theta
                theta = ts["theta"][0]
            out = {}
            for name, spec in rule.hyperparameters.items():
                if spec.kind == "flag":
                    continue
                if name in learn:
                    j = learn.index(name)
                    nat = to_natural(theta[j * units : (j + 1) * units], self._how(0, name))
                    vec = nat.to(device)[unit_index]
                    if name == "lr":
                        ramp = self._ramp_factor(ts)
                        if ramp is not None:
                            vec = vec * ramp.to(vec.device, vec.dtype)
                        # A scheduler rewrites group["lr"]; it multiplies the learned step size.
                        factors = [g["lr"] / g["initial_lr"] if g["initial_lr"] else 1.0 for g in groups]
                        if any(f != 1.0 for f in factors):
                            vec = vec * torch.tensor(factors, dtype=vec.dtype, device=device)[group_index]
                    out[name] = vec
                else:
                    vals = torch.tensor([_group_value(g, name) for g in groups], dtype=dtype, device=device)
                    out[name] = vals[group_index]
            return Hyper(out, zero)

        return build

    def _step_weights(self, ts: dict) -> None:
        learn = self._learn[0] if self.height else ()
        for b in self._buckets:
            grads = [local_tensor(p.grad) for p in b.params]
            state = {
                n: [local_tensor(self.state[p][n]) for p in b.params]
                for n in self._rules[0].state_names
                if n in self.state[b.params[0]]
            }
            theta = ts["theta"][0] if learn else None
            run_rule(
                self._rules[0],
                b.local,
                grads,
                state,
                b.work,
                self._level0_hyper_fn(ts, b),
                self._weight_steps(ts, b),
                theta,
                learn,
                b.views,
                self.levels[1].trace if self.height else 0.0,
            )

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
                if self._tower_state:
                    theta = self._tower_state["theta"][k].detach().double().cpu()
                    units = theta.numel() // len(names)
                    for j, name in enumerate(names):
                        nat = to_natural(theta[j * units : (j + 1) * units], self._how(k, name))
                        if k == 0 and name == "lr" and self._ramped():  # the lr the weights use
                            nat = nat * self._tower_state["ramp"].detach().double().cpu()
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
                    else {n_: _group_value(self.param_groups[0], n_) for n_ in rule.hyperparameters}
                )
                learn = self.levels[k].learn or ("lr",)
                for name in learn:
                    entry[name] = values[name]
            out.append(entry)
        return out

    def skipped_hyper_updates(self) -> list[int]:
        """For each learned level, how many hyperparameter updates were skipped as non-finite."""
        if not self._tower_state:
            return [0] * max(self.height, 1)
        return [int(x) for x in self._tower_state["skipped"].tolist()]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        # Sharded (DTensor) state must own its storage to be saved; tangents are views of a flat buffer.
        sd["state"] = {i: {k: standalone(v) for k, v in s.items()} for i, s in sd["state"].items()}
        sd["tower"] = {
            "spec": self.spec,
            "scope": self.scope,
            "mode": self.mode,
            "learn": [list(x) for x in self._learn],
            "state": _clone_tree(self._tower_state) if self._tower_state else {},
        }
        # torch.distributed.checkpoint (FSDP2 checkpoints, Accelerate, the Trainer) keeps only "state" and
        # "param_groups": the same tower entry rides in the first group so that it survives.
        sd["param_groups"][0][TOWER_GROUP_KEY] = keep_empty(sd["tower"])
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict.get("param_groups") or [{}]
        tower = state_dict.get("tower", restore_empty(groups[0].get(TOWER_GROUP_KEY)))
        if not isinstance(tower, dict) or "spec" not in tower:
            raise ValueError(
                "this state_dict has no 'tower' entry: it was not saved by an hf_hyperopt tower optimizer "
                f"(expected one from {self.spec!r})"
            )
        mine = {"spec": self.spec, "scope": self.scope, "mode": self.mode, "learn": [list(x) for x in self._learn]}
        for key, value in mine.items():
            if tower.get(key) != value:
                raise ValueError(
                    f"state_dict is from a different tower: its {key} is {tower.get(key)!r}, this optimizer's is {value!r}"
                )
        state_dict = {k: v for k, v in state_dict.items() if k != "tower"}
        state_dict["param_groups"] = [{k: v for k, v in g.items() if k != TOWER_GROUP_KEY} for g in groups]
        tower_state = checked_tower_state(self, state_dict, tower["state"])  # raises before anything changes
        super().load_state_dict(state_dict)
        self._tower_state = tower_state
        self._buckets = None  # tangent views are rebuilt on the next step


def _per_length(h: Tensor, norms_sq: Tensor) -> Tensor:
    """``h / sqrt(norms_sq)``, and 0 where the norm is 0 (no step taken yet)."""
    return torch.where(norms_sq > 0, h / norms_sq.sqrt().clamp_min(torch.finfo(h.dtype).tiny), torch.zeros_like(h))


def _squared_norms(tensors: list[Tensor]) -> Tensor:
    """``|t|^2`` of each tensor, in one fused pass."""
    norms = torch.stack(torch._foreach_norm(tensors))
    return (norms.float() if norms.dtype in (torch.float16, torch.bfloat16) else norms).square()


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` over all elements, accumulated in at least float32."""
    if a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _constant_dtype_device(like: Tensor) -> tuple[torch.dtype, torch.device]:
    """Where fixed hyperparameters live: float64 on the CPU, so that :func:`scalars` hands
    ``_foreach_*`` ops the same Python floats ``torch.optim`` uses; the tensors' device otherwise."""
    if like.device.type == "cpu":
        return torch.float64, like.device
    return (torch.float64 if like.dtype == torch.float64 else torch.float32), like.device


def _clone_tree(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone_tree(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clone_tree(v) for v in x]
    return x


_GROUP_KEYS = {"beta1": ("betas", 0), "beta2": ("betas", 1)}


def _group_value(group: dict[str, Any], name: str) -> float:
    if name in _GROUP_KEYS:
        key, i = _GROUP_KEYS[name]
        return float(group[key][i])
    return float(group[name])


def _group_defaults(cfg: LevelConfig) -> dict[str, Any]:
    values = cfg.full_values()
    defaults: dict[str, Any] = {}
    for name, v in values.items():
        if name in _GROUP_KEYS:
            defaults["betas"] = (values["beta1"], values["beta2"])
        elif cfg.rule.hyperparameters[name].kind == "flag":
            defaults[name] = bool(v)
        else:
            defaults[name] = v
    return defaults
