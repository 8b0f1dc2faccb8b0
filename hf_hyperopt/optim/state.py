"""The tower's own state, held once, and how it is written into a state dict and read back.

Beside ``torch.optim``'s per-parameter state (the weight level's moments and the tangents, in
``state[p]``), a tower keeps a handful of small tensors: the learned (raw) hyperparameters of every
level below the top, the upper levels' state and the tangents they learn from, the step counts, the
counts of skipped updates and the ramp. :class:`TowerState` holds them.

In a state dict the tower is one flat entry in the first param group, ``param_groups[0]["hyper_tower"]``
(:data:`~.distributed.TOWER_GROUP_KEY`): ``torch.distributed.checkpoint`` (FSDP2 checkpoints in
Accelerate and the ``Trainer``) keeps only ``state`` and ``param_groups``, and its flattening drops
empty lists and dicts. The entry therefore holds no containers that can be empty: strings that name
the tower (``spec``, ``scope``, ``mode``), then one key per tensor, e.g.::

    {"spec": "adam(lr=0.01)/adam(lr=0.01)/sgd(lr=0.001)", "scope": "shared", "mode": "default",
     "state.theta.0": tensor([-4.6]), "state.theta.1": tensor([-4.6]),
     "state.upper_state.0.exp_avg": ..., "state.upper_state.0.exp_avg_sq": ...,
     "state.upper_tangent.0.lr": ..., "state.step": [[5, 5, 5, 5], 5, 5], "state.skipped": tensor([0, 0])}

Before the first step only the three strings are there. The keys are the dotted paths of 0.1.0's
nested entry, whose flattened form is what ``torch.distributed.checkpoint`` stored, so that a DCP
checkpoint written by 0.1.0 fills the template of a new optimizer. A state dict written by 0.1.0
in memory or with ``torch.save`` (the nested entry at ``sd["tower"]`` and again, with marker strings
for empty containers, in the first param group) is read by :func:`read_tower_entry` as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..levels.base import to_raw
from .distributed import TOWER_GROUP_KEY
from .ramp import RampState

if TYPE_CHECKING:
    from .engine import TowerOptimizer

# What the flat keys of the tower state start with (the nested entry's "state" in 0.1.0).
STATE_PREFIX = "state."
IDENTITY = ("spec", "scope", "mode")


@dataclass
class TowerState:
    """The tower's state beside ``torch.optim``'s per-parameter state.

    Attributes:
        theta: for each level ``k`` below the top, its learned hyperparameters as raw coordinates
            (log, logit, ...), one vector: each learned name's values, one per unit, one name after another.
        upper_state: for each level ``k >= 1`` (at ``k - 1``), its rule's state over ``theta[k - 1]``.
        upper_tangent: for each level ``k >= 1`` (at ``k - 1``), the tangent of its last update of
            ``theta[k - 1]`` with respect to each name it learns (a trace of them, with ``trace``).
        weight_steps: per weight tensor, in ``param_groups`` order, the steps in which it had a gradient
            (as ``torch.optim`` counts ``state[p]["step"]``). Host ints, so that bias corrections need
            no device read.
        level_steps: for each level ``k >= 1`` (at ``k - 1``), its steps.
        skipped: for each learned level, how many hyperparameter updates were skipped as non-finite.
        ramp: the ramp of the weights' learned lr (``ramp=`` on level 1), or ``None``.
    """

    theta: list[Tensor]
    upper_state: list[dict[str, Tensor]]
    upper_tangent: list[dict[str, Tensor]]
    weight_steps: list[int]
    level_steps: list[int]
    skipped: Tensor
    ramp: RampState | None = None

    def to_entries(self) -> dict[str, Any]:
        """The state as flat ``state.*`` entries (copies), none of them an empty container."""
        out: dict[str, Any] = {}
        for k, theta in enumerate(self.theta):
            out[f"state.theta.{k}"] = theta.detach().clone()
        for key, levels in (("upper_state", self.upper_state), ("upper_tangent", self.upper_tangent)):
            for i, tensors in enumerate(levels):
                for name, t in tensors.items():
                    out[f"state.{key}.{i}.{name}"] = t.detach().clone()
        out["state.step"] = [list(self.weight_steps), *self.level_steps]
        out["state.skipped"] = self.skipped.detach().clone()
        if self.ramp is not None:
            out["state.ramp"] = self.ramp.factor.detach().clone()
            out["state.ramp_target"] = self.ramp.target.detach().clone()
            out["state.ramp_sized"] = self.ramp.sized
            out["state.ramp_active"] = self.ramp.active.detach().clone()
            if self.ramp.search is not None:
                out["state.ramp_search"] = self.ramp.search.detach().clone()
        return out


def tower_entry(identity: dict[str, str], state: TowerState | None) -> dict[str, Any]:
    """The tower's entry for ``param_groups[0]``: its ``identity`` (spec, scope, mode) and its state, flat."""
    return {**identity, **(state.to_entries() if state is not None else {})}


def read_tower_entry(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The saved tower's identity and its flat ``state.*`` entries (empty before its first step).

    Reads the entry in the first param group, or one in 0.1.0's nested layout there or at
    ``state_dict["tower"]``. Returns ``None`` when there is none.

    Raises:
        ValueError: for a 0.1.0 entry whose state is not the nested dict 0.1.0 wrote.
    """
    groups = state_dict.get("param_groups") or [{}]
    entry = groups[0].get(TOWER_GROUP_KEY) if isinstance(groups[0], dict) else None
    legacy = state_dict.get("tower")
    if entry is None or (legacy is not None and "state" in entry):
        entry = legacy  # 0.1.0 wrote the same nested entry in both places; "tower" has no marker strings
    if not isinstance(entry, dict) or "spec" not in entry:
        return None
    identity = {key: entry.get(key) for key in IDENTITY}
    if "state" not in entry:  # this version's flat entry
        return identity, {k: v for k, v in entry.items() if k.startswith(STATE_PREFIX)}
    nested = _restore_empty(entry["state"])
    if not isinstance(nested, dict):
        raise ValueError(
            "state_dict tower entry is in the layout of hf_hyperopt 0.1.0, but its 'state' is a "
            f"{type(nested).__name__}, not the dict 0.1.0 wrote: the checkpoint is damaged"
        )
    return identity, _flatten(nested, "state")


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    """0.1.0's nested tower state as flat entries, flattened as ``torch.distributed.checkpoint`` does.

    Dicts, and lists holding tensors or dicts, are walked; any other list (the step counts) is one value.
    """
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and any(isinstance(v, (Tensor, dict)) for v in tree):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(_flatten(value, f"{prefix}.{key}"))
    return out


# 0.1.0 stood these strings in for empty lists and dicts, which torch.distributed.checkpoint drops.
_EMPTY = {"<hf_hyperopt: empty list>": list, "<hf_hyperopt: empty dict>": dict}


def _restore_empty(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _restore_empty(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_restore_empty(v) for v in tree]
    if isinstance(tree, str) and tree in _EMPTY:
        return _EMPTY[tree]()
    return tree


def initial_state(opt: TowerOptimizer, device: torch.device, dtype: torch.dtype) -> TowerState:
    """The tower state before the first step: the learned values as given, fresh upper-level state."""
    n = len(opt.levels)
    thetas = []
    for k in range(n - 1):
        if k == 0:
            per_unit = opt._level0_unit_values()
            raw = [to_raw(per_unit[name][u], opt._how(k, name)) for name in opt._learn[0] for u in range(opt._units())]
        else:
            values = opt.levels[k].full_values()
            raw = [to_raw(values[name], opt._how(k, name)) for name in opt._learn[k]]
        thetas.append(torch.tensor(raw, dtype=dtype, device=device))
    return TowerState(
        theta=thetas,
        upper_state=[opt._rules[k].init_state(thetas[k - 1], opt.levels[k].full_values()) for k in range(1, n)],
        upper_tangent=[{name: torch.zeros_like(thetas[k - 1]) for name in opt._learn[k]} for k in range(1, n)],
        weight_steps=[0] * opt._n_params(),
        level_steps=[0] * (n - 1),
        skipped=torch.zeros(max(n - 1, 1), dtype=torch.int64, device=device),
        ramp=RampState.start(dtype, device, bool(opt.levels[1].ramp_search)) if opt._ramped() else None,
    )
