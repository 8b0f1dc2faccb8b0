"""The steps: every level above the weights top-down, then the weights, each with its rule.

Level ``k >= 1`` updates ``theta[k - 1]`` (the raw learned values of the level below) from ``h[k - 1]``
with its rule, keeping the tangent of that update for the level above it; a coordinate whose
hypergradient was skipped keeps its value and state, and every coordinate stays finite (and, by
default, inside its bounds). Then the weight level updates the weights with the hyperparameters the
level above has just set, writing the tangents the next step's hypergradient reads.

Hyperparameters are handed to a rule as one value per tensor (:class:`~hf_hyperopt.levels.base.Hyper`),
built from ``theta`` by a function, so that :mod:`.tangents` can differentiate them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..levels.base import Hyper, Rule, raw_bounds, to_natural
from .buckets import Bucket
from .config import validate_value
from .distributed import local_tensor, wrap_like
from .tangents import run_rule

if TYPE_CHECKING:
    from .config import LevelConfig
    from .engine import TowerOptimizer
    from .state import TowerState


def count_step(opt: TowerOptimizer, ts: TowerState) -> None:
    """One more step for every level above the weights and for each tensor that has a gradient.

    New lists rather than in-place increments, so that :func:`.rollback.rollback_on_error`'s copy of
    the old ones stays as it was.
    """
    counts = list(ts.weight_steps)
    for b in opt._buckets:
        for i in b.positions:
            counts[i] += 1
    ts.weight_steps = counts
    ts.level_steps = [s + 1 for s in ts.level_steps]


def bucket_step_counts(ts: TowerState, b: Bucket) -> int | Tensor:
    """The step counts of a bucket's tensors: one int when they agree (the usual case), else one per tensor."""
    counts = [ts.weight_steps[i] for i in b.positions]
    if all(c == counts[0] for c in counts):
        return counts[0]
    dtype, device = constant_dtype_device(b.local[0])
    return torch.tensor(counts, dtype=dtype, device=device)


def step_upper_levels(
    opt: TowerOptimizer, ts: TowerState, hypergrads: list[Tensor], skip_masks: dict[int, Tensor]
) -> None:
    """Step every level above the weights, top first, on the vector of raw values of the level below."""
    n = len(opt.levels)
    for k in range(n - 1, 0, -1):
        theta = ts.theta[k - 1]
        old = theta.clone()
        old_state = {name: v.clone() for name, v in ts.upper_state[k - 1].items()}
        tangents = {name: [torch.empty_like(theta)] for name in opt._learn[k]}
        run_rule(
            opt._rules[k],
            [theta],
            [hypergrads[k - 1]],
            {n_: [v] for n_, v in ts.upper_state[k - 1].items()},
            {n_: [torch.empty_like(theta)] for n_ in opt._rules[k].workspace_names} if k == n - 1 else {},
            upper_hyper_fn(opt, ts, k),
            ts.level_steps[k - 1],
            ts.theta[k] if k < n - 1 else None,
            opt._learn[k],
            tangents,
        )
        # The level above (k + 1) may learn from a trace of these tangents.
        trace = opt._trace(k + 1) if k + 1 < n else 0.0
        kept = ts.upper_tangent[k - 1]
        for name, tangent in tangents.items():
            kept[name] = trace * kept[name] + tangent[0] if trace else tangent[0]
        keep_skipped(ts, k - 1, old, old_state, skip_masks[k - 1])
        bound(opt, ts, k - 1, old)


def keep_skipped(ts: TowerState, k: int, old: Tensor, old_state: dict[str, Tensor], bad: Tensor) -> None:
    """Undo this step's update of theta[k] where its hypergradient was skipped (``bad``).

    The zero that stands in for such a hypergradient is not enough: an adaptive level (Adam,
    RMSProp) would still move the value on its momentum and decay its moments with a gradient it
    never saw. The coordinate keeps its value and its state, and its tangent is zero (it did not
    move). Elementwise ``where`` on vectors of hyperparameters: no device read.
    """
    theta = ts.theta[k]
    theta.copy_(torch.where(bad, old, theta))
    for name, v in ts.upper_state[k].items():
        v.copy_(torch.where(bad, old_state[name], v))
    tangents = ts.upper_tangent[k]
    for name, t in tangents.items():
        tangents[name] = torch.where(bad, torch.zeros_like(t), t)


def bound(opt: TowerOptimizer, ts: TowerState, k: int, old: Tensor) -> None:
    """Keep the learned coordinates of level k finite (and, by default, inside their bounds)."""
    theta = ts.theta[k]
    finite = torch.isfinite(theta)
    ts.skipped[k].add_((~finite).sum())
    theta.copy_(torch.where(finite, theta, old))
    if opt.mode == "default":
        units = len(theta) // len(opt._learn[k])
        for j, name in enumerate(opt._learn[k]):
            lo, hi = raw_bounds(opt._rules[k].hyperparameters[name].kind)
            theta[j * units : (j + 1) * units].clamp_(lo, hi)


def upper_hyper_fn(opt: TowerOptimizer, ts: TowerState, k: int) -> Callable[[Tensor | None], Hyper]:
    """Hyperparameters of upper level k (one tensor), as a function of its possibly-dual theta."""
    values = opt.levels[k].full_values()
    rule = opt._rules[k]
    learn = opt._learn[k]
    theta_ref = ts.theta[k] if k < len(opt.levels) - 1 else None
    dtype, device = constant_dtype_device(ts.theta[k - 1])
    zero = frozenset(n for n, v in values.items() if v == 0.0 and n not in learn)
    scale = timescale_factor(opt.levels[k].timescale, ts.level_steps[k - 1])

    def build(theta: Tensor | None) -> Hyper:
        at = theta if theta is not None else theta_ref

        def learned(name: str, j: int) -> Tensor:
            return to_natural(at[j : j + 1], opt._how(k, name))

        hp = _rule_values(rule, learn, learned, lambda n: torch.full((1,), values[n], dtype=dtype, device=device))
        if scale != 1.0:  # a learned lr too: its tangent then carries the factor
            hp["lr"] = hp["lr"] * scale
        return Hyper(hp, zero)

    return build


def timescale_factor(timescale: float, step: int) -> float:
    """The factor ``min(1, sqrt(timescale / step))`` on a level's step size at its ``step``-th step; 1 without a timescale."""
    return min(1.0, math.sqrt(timescale / max(step, 1))) if timescale else 1.0


def level0_hyper_fn(opt: TowerOptimizer, ts: TowerState, b: Bucket) -> Callable[[Tensor | None], Hyper]:
    """Hyperparameters of the weight level, one per tensor of ``b``, as a function of its possibly-dual theta."""
    rule = opt._rules[0]
    learn = opt._learn[0] if opt.height else ()
    units = opt._units()
    device = b.local[0].device
    dtype, _ = constant_dtype_device(b.local[0])
    groups = opt.param_groups
    unit_index = b.unit_index
    group_index = b.group_index
    zero = frozenset(
        n
        for n, s in rule.hyperparameters.items()
        if n not in learn and s.kind != "flag" and all(group_value(g, n) == 0.0 for g in groups)
    )

    def build(theta: Tensor | None) -> Hyper:
        if theta is None and learn:  # a tower of height 0 learns nothing and has no theta
            theta = ts.theta[0]

        def learned(name: str, j: int) -> Tensor:
            vec = to_natural(theta[j * units : (j + 1) * units], opt._how(0, name)).to(device)[unit_index]
            if name == "lr":
                if ts.ramp is not None:
                    vec = vec * ts.ramp.factor.to(vec.device, vec.dtype)
                # A scheduler rewrites group["lr"]; it multiplies the learned step size.
                factors = opt.schedule_factors()
                if any(f != 1.0 for f in factors):
                    vec = vec * torch.tensor(factors, dtype=vec.dtype, device=device)[group_index]
            return vec

        def fixed(name: str) -> Tensor:
            return torch.tensor([group_value(g, name) for g in groups], dtype=dtype, device=device)[group_index]

        return Hyper(_rule_values(rule, learn, learned, fixed), zero)

    return build


def _rule_values(
    rule: Rule, learn: tuple[str, ...], learned: Callable[[str, int], Tensor], fixed: Callable[[str], Tensor]
) -> dict[str, Tensor]:
    """Every non-flag hyperparameter of ``rule``: ``learned(name, j)`` for the j-th learned one, else ``fixed(name)``."""
    return {
        name: learned(name, learn.index(name)) if name in learn else fixed(name)
        for name, spec in rule.hyperparameters.items()
        if spec.kind != "flag"
    }


def step_weights(opt: TowerOptimizer, ts: TowerState) -> None:
    """Step the weights, bucket by bucket, writing the tangents the next hypergradient reads."""
    learn = opt._learn[0] if opt.height else ()
    for b in opt._buckets:
        grads = [local_tensor(p.grad) for p in b.params]
        state = {
            n: [local_tensor(opt.state[p][n]) for p in b.params]
            for n in opt._rules[0].state_names
            if n in opt.state[b.params[0]]
        }
        given = dict(state)
        run_rule(
            opt._rules[0],
            b.local,
            grads,
            state,
            b.work,
            level0_hyper_fn(opt, ts, b),
            bucket_step_counts(ts, b),
            ts.theta[0] if learn else None,
            learn,
            b.views,
            opt._trace(1) if opt.height else 0.0,
            b.held,
            b.scales,
        )
        swapped = [n for n, lst in state.items() if lst is not given[n]]
        for name in swapped:  # a rule holding tangents moves its buffers
            for p, t in zip(b.params, state[name], strict=True):
                opt.state[p][name] = wrap_like(p, t)
        if swapped:
            b.refresh_held(opt.state)


def constant_dtype_device(like: Tensor) -> tuple[torch.dtype, torch.device]:
    """Where fixed hyperparameters live: float64 on the CPU, so that :func:`scalars` hands
    ``_foreach_*`` ops the same Python floats ``torch.optim`` uses; the tensors' device otherwise."""
    if like.device.type == "cpu":
        return torch.float64, like.device
    return (torch.float64 if like.dtype == torch.float64 else torch.float32), like.device


# torch.optim keeps Adam's betas as one group key, the tower as two hyperparameters.
_GROUP_KEYS = {"beta1": ("betas", 0), "beta2": ("betas", 1)}


def schedule_factor(lr: float, base: float) -> float:
    """The factor an LR scheduler has put on the learned step size: a group's ``lr`` over its
    :meth:`~.engine.TowerOptimizer.schedule_base` (1 where that is 0)."""
    return float(lr) / base if base else 1.0


def beta_pair(at: str | None, betas: Any) -> tuple[Any, Any]:
    """``(beta1, beta2)`` from Adam's ``betas``, or ``ValueError`` naming what was given instead (and
    ``at``, the level, where known)."""
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"{at + ': ' if at else ''}betas={betas!r} must be a pair (beta1, beta2)")
    return betas[0], betas[1]


def check_group_values(rule: type[Rule], group: dict[str, Any], given_only: bool = False) -> None:
    """Raise ``ValueError`` naming the first of ``rule``'s hyperparameters that ``group`` holds out of range
    (the weight level's; ``given_only``: only those the group has, as in a saved state dict)."""
    for name in rule.hyperparameters:
        key, i = _GROUP_KEYS.get(name, (name, None))
        if given_only and key not in group:
            continue
        validate_value(0, rule, name, group[key] if i is None else beta_pair(None, group[key])[i])


def refuse_torch_only(options: dict[str, Any], torch_only: dict[str, tuple[Any, ...]], where: str) -> None:
    """Raise ``ValueError`` (starting with ``where``) for the first of ``torch_only`` (``torch.optim``
    options no level implements, with the values the tower runs as) that ``options`` sets to another value
    (``True`` is not ``1``)."""
    for name, accepted in torch_only.items():
        value = options.get(name, accepted[0])
        if not any(value is a or (not isinstance(value, bool) and a is not None and value == a) for a in accepted):
            raise ValueError(
                f"{where}: {name}={value!r} is not supported; a tower runs as torch.optim does with {name}={accepted[0]!r}"
            )


def check_group_options(cfg: LevelConfig, group: dict[str, Any], index: int, torch_only: dict[str, tuple]) -> None:
    """Raise ``ValueError`` for a param group that sets what the tower would ignore: a flag of the weight
    level's rule (``nesterov``) other than the level's, or one of ``torch_only`` (:func:`refuse_torch_only`)."""
    values = cfg.full_values()
    for name, spec in cfg.rule.hyperparameters.items():
        if spec.kind == "flag" and name in group and bool(group[name]) != bool(values[name]):
            raise ValueError(
                f"param group {index}: {name}={group[name]!r}, but the weight level ({cfg.rule.name}) runs with "
                f"{name}={bool(values[name])} for every group; give {name} to the optimizer itself"
            )
    if "decoupled_weight_decay" in torch_only:  # in a group it says which rule: torch.optim.Adam's carry False
        torch_only = {**torch_only, "decoupled_weight_decay": (cfg.rule.name == "adamw",)}
    refuse_torch_only(group, torch_only, f"param group {index}")


def group_value(group: dict[str, Any], name: str) -> float:
    """The value of hyperparameter ``name`` in a ``torch.optim`` param group."""
    if name in _GROUP_KEYS:
        key, i = _GROUP_KEYS[name]
        return float(group[key][i])
    return float(group[name])


def group_defaults(cfg: LevelConfig) -> dict[str, Any]:
    """A level's values as ``torch.optim`` param-group defaults (``betas`` a pair, flags bools)."""
    values = cfg.full_values()
    defaults: dict[str, Any] = {}
    for name, v in values.items():
        if name in _GROUP_KEYS:  # Adam's betas are one group key, a pair
            key = _GROUP_KEYS[name][0]
            defaults[key] = tuple(values[n] for n, (k, _) in _GROUP_KEYS.items() if k == key)
        elif cfg.rule.hyperparameters[name].kind == "flag":
            defaults[name] = bool(v)
        else:
            defaults[name] = v
    return defaults


def check_schedule_bases(opt: TowerOptimizer) -> None:
    """Refuse, at the first step, schedule bases a learned lr cannot start from: the bases a scheduler set
    (``group["initial_lr"]``) differ under ``scope="shared"`` (one learned lr, so the groups' own lrs would
    be lost: per-group ``max_lr`` of OneCycleLR ran every group at the first one's), or one is not positive
    (a group set to lr 0 before the scheduler was made)."""
    if opt.height == 0 or "lr" not in opt._learn[0]:
        return
    bases = [opt.schedule_base(i) for i in range(len(opt.param_groups))]
    if opt.scope == "shared" and len(set(bases)) > 1:
        raise ValueError(
            f"scope='shared' learns one lr for all param groups, but a scheduler gave them different base lrs "
            f"(group['initial_lr']: {bases}); use scope='group' to learn one per group"
        )
    for i, base in enumerate(bases):
        if opt.mode == "default" and not base > 0:
            raise ValueError(
                f"param group {i}'s base lr is {base!r} (group['initial_lr'], as a scheduler found it): a learned lr "
                "starts from it and must be positive; freeze the group's parameters (requires_grad=False) instead"
            )


def learned_group_values(opt: TowerOptimizer) -> dict[tuple[int, str], float]:
    """Each param group's values of what the weight level learns besides ``lr`` (which a schedule multiplies):
    the tower learns them from these values and then ignores the group's copy."""
    names = [n for n in (opt._learn[0] if opt.height else ()) if n != "lr"]
    return {(i, n): group_value(g, n) for i, g in enumerate(opt.param_groups) for n in names}


def check_learned_unwritten(opt: TowerOptimizer, start: dict[tuple[int, str], float]) -> None:
    """Refuse a learned value that something wrote into its param group after the tower took it over
    (``start``: :func:`learned_group_values` then), e.g. OneCycleLR's ``cycle_momentum``: it would be ignored."""
    for (i, name), value in learned_group_values(opt).items():
        if (i, name) in start and value != start[i, name]:
            cycled = " (OneCycleLR/CyclicLR: cycle_momentum=False)" if name in ("beta1", "momentum") else ""
            raise ValueError(
                f"param group {i}'s {name} was set to {value!r} after the tower began learning it from "
                f"{start[i, name]!r}; the tower ignores such writes. Stop the writes{cycled}, or do not learn {name}"
            )
