"""What ``TowerOptimizer.load_state_dict`` checks before it changes anything.

``torch.optim.Optimizer.load_state_dict`` checks the number of param groups and of parameters per
group, then casts each state tensor to its parameter's dtype and device. It does not look at shapes
or values: a state dict from a model with other parameter shapes loads and the next step fails
halfway; one whose learned values are NaN loads and poisons the weights a step later. A tower's
learned hyperparameters are what a checkpoint exists to keep, so everything is checked here, first:

- the param groups and the number of parameters in each (as ``torch.optim``, with the counts named);
- every per-parameter state tensor has its parameter's shape and finite values;
- the tower's own state (learned values, the upper levels' state and tangents, the step counts) has
  the layout this tower expects and finite values; it is cast, as ``torch.optim`` casts parameter
  state, to the tower's dtype (float32, float64 for float64 parameters) and to the parameters' device.

The tower's state is read from its flat ``state.*`` entries (:mod:`.state`), key by key as this tower
lays it out: a missing entry is named, an extra one (0.1.0 kept the spec in the state too) is ignored.

Step counts: ``state.step`` is ``[per-tensor counts, level 1's, level 2's, ...]``; the weight level's
holds one count per weight tensor (the steps in which it had a gradient, as ``torch.optim`` counts
``state[p]["step"]``). Checkpoints written before the weight level counted per tensor hold one count
there; each tensor with saved state (every tensor that had taken a step) takes that count, a tensor
without state 0, as it would have in ``torch.optim``. The counts live in the tower entry rather than
in ``state[i]``: a ``torch.distributed.checkpoint`` load fills a template taken from a fresh optimizer
and refuses any key the checkpoint lacks, and the tower entry's ``state.step`` key is there in old
checkpoints and new ones.

Any difference raises ``ValueError`` naming the entry, what it holds and what this optimizer has.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import Tensor

from ..levels.base import raw_bounds
from .buckets import SCALE_PREFIX, TANGENT_PREFIX
from .config import as_number
from .distributed import local_tensor
from .ramp import RAMP_SEARCH_DOUBLINGS, RampState
from .state import TowerState
from .stepping import check_group_values, group_value


def checked_tower_state(opt: Any, state_dict: dict[str, Any], entries: dict[str, Any]) -> TowerState | None:
    """Check ``state_dict`` (its tower entry already removed) against ``opt``; return the tower state to load.

    Args:
        opt: the :class:`~hf_hyperopt.optim.engine.TowerOptimizer` being loaded.
        state_dict: ``state`` and ``param_groups`` as ``torch.optim`` saves them.
        entries: the saved tower state's flat ``state.*`` entries (:mod:`.state`; none when the saved
            tower had not stepped).

    Returns:
        The tower state, cast to the tower's dtype and the parameters' device; ``None`` before a first step.

    Raises:
        ValueError: naming the first entry that does not fit ``opt``.
    """
    groups = state_dict.get("param_groups") or []
    params = _check_groups(opt, groups)
    # Saved state is keyed by the ids listed in the saved groups (indices, or names under
    # torch.distributed.checkpoint), matched to this optimizer's parameters by position, as torch.optim does.
    index = dict(zip((i for g in groups for i in g["params"]), params, strict=True))
    state = state_dict.get("state") or {}
    _check_param_state(opt, index, state)
    if not entries:
        return None
    stepped = [bool(state.get(i)) for g in groups for i in g["params"]]
    return _check_tower_state(opt, params, entries, stepped)


def _check_groups(opt: Any, groups: list[dict[str, Any]]) -> list[Tensor]:
    mine = opt.param_groups
    if len(groups) != len(mine):
        raise ValueError(
            f"state_dict has {len(groups)} param group(s), this optimizer has {len(mine)}: it was saved for a model "
            "split into other groups"
        )
    rule = opt.levels[0].rule
    for i, (saved, group) in enumerate(zip(groups, mine, strict=True)):
        n_saved = len(saved.get("params", []))
        if n_saved != len(group["params"]):
            raise ValueError(
                f"state_dict param group {i} has {n_saved} parameter(s), this optimizer's has {len(group['params'])}: "
                "it was saved for another model"
            )
        # torch.optim replaces the groups' values with these: the constructor's checks, and a schedule's base.
        try:
            check_group_values(rule, saved, given_only=True)
            if "initial_lr" in saved:  # the lr a schedule's factor is taken against
                base = as_number("", "initial_lr", saved["initial_lr"])
                if not (math.isfinite(base) and base >= 0):
                    raise ValueError(f"initial_lr={base!r} must be a finite number >= 0")
        except ValueError as err:
            raise ValueError(f"state_dict param group {i}: {err}") from None
    return [p for g in mine for p in g["params"]]


def _check_param_state(opt: Any, index: dict[Any, Tensor], state: dict[Any, dict[str, Any]]) -> None:
    rule = opt._rules[0]
    names = set(rule.state_names)
    learned = opt._learn[0] if len(opt.levels) > 1 else ()
    # The state a parameter that has stepped keeps, by its group's values (SGD keeps no momentum buffer at 0).
    kept_for: dict[int, tuple[str, ...]] = {}
    for g in opt.param_groups:
        kept = tuple(rule.init_state(torch.zeros(1), {n: group_value(g, n) for n in rule.hyperparameters}))
        kept_for.update((id(q), kept) for q in g["params"])
    for key, entry in state.items():
        if key not in index:
            raise ValueError(f"state_dict has state for parameter {key!r}, which none of its param groups lists")
        p = index[key]
        for name, state_name in opt._held.items():
            if SCALE_PREFIX + name in entry and state_name not in entry:
                raise ValueError(
                    f"state_dict state of parameter {key} has {SCALE_PREFIX + name!r} but no {state_name!r}, the "
                    f"buffer that holds {name}'s tangent: it is damaged"
                )
        # A parameter that has stepped has all of the rule's state and a tangent (or a held tangent's
        # constant) for each learned name; a partial entry would fail mid-step or resume inexactly.
        if any(n in entry for n in names):
            # A held tangent's buffer that 0.1.0 wrote as a tangent becomes that buffer (hold_saved_tangents).
            written = {opt._held[n] for n in opt._held if TANGENT_PREFIX + n in entry}
            needed = [n for n in kept_for[id(p)] if n not in entry and n not in written]
            needed += [
                SCALE_PREFIX + n if n in opt._held else TANGENT_PREFIX + n
                for n in learned
                if SCALE_PREFIX + n not in entry and TANGENT_PREFIX + n not in entry  # 0.1.0 wrote tangents
            ]
            if needed:
                raise ValueError(
                    f"state_dict state of parameter {key} has no {', '.join(map(repr, needed))}, which this tower "
                    f"keeps for every parameter that has taken a step (it has {', '.join(map(repr, entry))}): it is "
                    "damaged"
                )
        for name, value in entry.items():
            if name.startswith(SCALE_PREFIX):  # a held tangent's constant: one number
                if not isinstance(value, Tensor) or value.numel() != 1:
                    raise ValueError(f"state_dict state {name!r} of parameter {key} is not one number: it is damaged")
                _check_finite(value, f"state {name!r} of parameter {key}")
                continue
            if not isinstance(value, Tensor) or not (name in names or name.startswith(TANGENT_PREFIX)):
                continue
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(
                    f"state_dict state {name!r} of parameter {key} has shape {tuple(value.shape)}, the parameter "
                    f"has shape {tuple(p.shape)}: it was saved for a model with other parameter shapes"
                )
            _check_finite(value, f"state {name!r} of parameter {key}")
            if name in rule.nonnegative_state and bool((local_tensor(value) < 0).any()):
                raise ValueError(
                    f"state_dict state {name!r} of parameter {key} holds negative values, and it is a running sum "
                    "of squares: it is damaged"
                )


def _check_tower_state(opt: Any, params: list[Tensor], ts: dict[str, Any], stepped: list[bool]) -> TowerState:
    height = len(opt.levels) - 1
    first = local_tensor(params[0]) if params else torch.empty(0)
    dtype, device = opt._hyper_dtype(first.dtype), first.device

    def get(key: str) -> Any:
        if "state." + key not in ts:
            raise ValueError(f"state_dict tower state has no {key!r} entry: it is damaged or from another version")
        return ts["state." + key]

    def cast(key: str, what: str, shape: tuple[int, ...] | None = None) -> Tensor:
        t = get(key)
        if not isinstance(t, Tensor):
            raise ValueError(f"state_dict tower {what} is a {type(t).__name__}, not a tensor")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"state_dict tower {what} has shape {tuple(t.shape)}, expected {shape}")
        _check_finite(t, f"tower {what}")
        return t.detach().to(dtype=dtype, device=device, copy=True)

    thetas = []
    for k in range(height):
        units = opt._units() if k == 0 else 1
        want = units * len(opt._learn[k])
        theta = get(f"theta.{k}")
        if not isinstance(theta, Tensor) or theta.numel() != want:
            got = theta.numel() if isinstance(theta, Tensor) else type(theta).__name__
            raise ValueError(
                f"state_dict tower: level {k} holds {got} learned value(s), this tower learns {want} "
                f"({'+'.join(opt._learn[k])} x {units} unit(s), scope={opt.scope!r})"
            )
        thetas.append(cast(f"theta.{k}", f"learned values of level {k}"))
        if opt.mode == "default":  # each learned coordinate inside the bounds the step keeps it in
            for j, name in enumerate(opt._learn[k]):
                lo, hi = raw_bounds(opt._rules[k].hyperparameters[name].kind)
                # (a margin for float32's rounding of the bound the step clamps to)
                raw = thetas[-1][j * units : (j + 1) * units]
                if bool(((raw < lo - 1e-3) | (raw > hi + 1e-3)).any()):
                    raise ValueError(
                        f"state_dict tower learned {name} of level {k} holds a coordinate outside [{lo:.4g}, {hi:.4g}], "
                        "where the tower keeps it: it is damaged"
                    )
    uppers, tangents = [], []
    for k in range(1, height + 1):
        shape = tuple(thetas[k - 1].shape)
        uppers.append(
            {
                name: cast(f"upper_state.{k - 1}.{name}", f"upper_state {name!r} of level {k}", shape)
                for name in opt._upper_state_names(k)
            }
        )
        tangents.append(
            {
                name: cast(f"upper_tangent.{k - 1}.{name}", f"upper_tangent {name!r} of level {k}", shape)
                for name in opt._learn[k]
            }
        )
    steps = get("step")
    if not isinstance(steps, (list, tuple)) or len(steps) != height + 1:
        got = len(steps) if isinstance(steps, (list, tuple)) else type(steps).__name__
        raise ValueError(f"state_dict tower step has {got} entries, this tower has {height + 1} levels to fill")
    weight_steps, level_steps = _checked_steps(list(steps), stepped)
    skipped = get("skipped")
    if not isinstance(skipped, Tensor) or skipped.numel() != max(height, 1):
        raise ValueError(
            f"state_dict tower skipped must be a tensor of {max(height, 1)} count(s), one per learned level"
        )
    return TowerState(
        theta=thetas,
        upper_state=uppers,
        upper_tangent=tangents,
        weight_steps=weight_steps,
        level_steps=level_steps,
        skipped=skipped.detach().to(device=device, copy=True),
        ramp=_checked_ramp(ts, cast, device, bool(opt.levels[1].ramp_search)) if opt._ramped() else None,
    )


def _checked_ramp(ts: dict[str, Any], cast: Any, device: torch.device, searches: bool) -> RampState:
    ramp = ts.get("state.ramp")
    if not isinstance(ramp, Tensor) or ramp.numel() != 1:
        raise ValueError("state_dict tower state has no ramp factor, but this tower ramps its lr (ramp= on level 1)")
    factor = cast("ramp", "ramp factor")
    if not float(factor) > 0.0:
        raise ValueError(f"state_dict tower ramp factor is {float(factor)!r}; it must be > 0")
    active = ts.get("state.ramp_active")
    if not isinstance(active, Tensor) or active.numel() != 1:
        raise ValueError("state_dict tower state has no ramp_active flag, but this tower ramps its lr")
    active = active.detach().to(device=device, dtype=torch.bool, copy=True)
    target = ts.get("state.ramp_target")
    if target is None:  # saved before the ramp had a target: it searched up to the initial lr
        target = torch.ones_like(factor) if bool(active) else factor.clone()
    elif not isinstance(target, Tensor) or target.numel() != 1:
        raise ValueError("state_dict tower ramp_target must be a 1-element tensor")
    else:
        target = cast("ramp_target", "ramp target")
    if not float(target) > 0.0:
        raise ValueError(f"state_dict tower ramp target is {float(target)!r}; it must be > 0")
    search = None
    if searches:
        search = ts.get("state.ramp_search")
        if search is None:
            raise ValueError("state_dict tower state has no 'ramp_search' entry: it is damaged")
        if (
            not isinstance(search, Tensor)
            or search.numel() != 1
            or search.dtype not in (torch.int32, torch.int64)
            or not -1 <= int(search) <= RAMP_SEARCH_DOUBLINGS + 1
        ):
            raise ValueError(
                f"state_dict tower ramp_search must be one integer in [-1, {RAMP_SEARCH_DOUBLINGS + 1}] (where the "
                f"search stands), not {search!r}: it is damaged"
            )
        search = search.detach().to(device=device, dtype=torch.int64, copy=True).reshape(1)
    ramp = RampState(
        factor=factor, target=target, sized=bool(ts.get("state.ramp_sized", True)), active=active, search=search
    )
    ramp.searching = search is not None and bool(search != 0)
    return ramp


def _checked_steps(steps: list[Any], stepped: list[bool]) -> tuple[list[int], list[int]]:
    """The step counts to load (per weight tensor, per upper level), converted from one count at level 0 if need be."""
    upper = [_count(s, f"step count of level {k}") for k, s in enumerate(steps[1:], start=1)]
    level0 = steps[0]
    if not isinstance(level0, (list, tuple)):  # written before the weight level counted per tensor
        count = _count(level0, "step count of level 0")
        return [count if s else 0 for s in stepped], upper
    if len(level0) != len(stepped):
        raise ValueError(
            f"state_dict tower step counts of level 0 hold {len(level0)} entries, one per parameter; this "
            f"optimizer has {len(stepped)} parameters"
        )
    return [_count(c, f"step count of parameter {i}") for i, c in enumerate(level0)], upper


def _count(value: Any, what: str) -> int:
    try:
        count = operator.index(value)  # an int, or a one-element integer tensor
    except TypeError:
        raise ValueError(f"state_dict tower {what} is {value!r}, not a whole number") from None
    if count < 0:
        raise ValueError(f"state_dict tower {what} is {count}; a step count must be >= 0")
    return count


def _check_finite(t: Tensor, what: str) -> None:
    local = local_tensor(t)
    if local.is_floating_point() and not bool(torch.isfinite(local).all()):
        bad = int((~torch.isfinite(local)).sum())
        raise ValueError(
            f"state_dict {what} holds {bad} non-finite value(s) (NaN or inf): the checkpoint is damaged; load an "
            "earlier one"
        )
