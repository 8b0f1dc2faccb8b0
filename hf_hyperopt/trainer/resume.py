"""Resuming a ``HyperTrainer`` run: what is checked so that a resume never silently changes the learned values.

``Trainer`` resumes from whatever a checkpoint folder holds. For a tower optimizer the learned
hyperparameters live in ``optimizer.pt``, so three things are handled here:

- ``resume_from_checkpoint=True`` takes the newest *complete* checkpoint: ``Trainer`` writes a
  checkpoint's files one after another and ``trainer_state.json`` near the end, so a run killed while
  saving leaves a folder without it (or with it torn); ``get_last_checkpoint`` would pick that folder
  and resume from step 0 or without the optimizer.
- A checkpoint whose optimizer state is not there (``save_only_model=True``, a file deleted) resumes
  with a fresh tower: this warns, naming the learned values that are lost (read from the checkpoint's
  trajectory), and the model card says from which step the values restarted.
- A checkpoint whose optimizer state cannot be read (a truncated or corrupt file) stops the resume
  with one error naming the checkpoint, before any step and before the trajectory file is touched.

And for the model card: with ``load_best_model_at_end`` the saved weights are those of the best
checkpoint, so the card's hyperparameters are those that checkpoint was trained with
(:func:`hyperparameters_at`).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

from ..optim.distributed import TOWER_GROUP_KEY
from ..optim.engine import DifferentTowerError
from .trajectory import TRAJECTORY_NAME, empty_groups, hyper_log_keys, salvage_trajectory

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


class TowerNotRestoredWarning(UserWarning):
    """A run resumed from a checkpoint without the tower's state: its learned hyperparameters restart."""


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` whose ``trainer_state.json`` parses, or ``None`` if there is none.

    Incomplete newer folders (a run killed while saving) are skipped with a warning that names them.

    Raises:
        ValueError: if there are checkpoints and none of them is complete.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))),
        reverse=True,
    )
    skipped = []
    for _, path in found:
        if _unreadable_state(path) is not None:
            skipped.append(path.name)
            continue
        if skipped:
            warnings.warn(
                f"resuming from {path.name}: the newer {', '.join(skipped)} in {folder} is incomplete (no readable "
                f"{TRAINER_STATE}; the run stopped while saving it) and is skipped",
                stacklevel=3,
            )
        return str(path)
    if skipped:
        raise ValueError(
            f"no complete checkpoint to resume from in {folder}: {', '.join(skipped)} have no readable "
            f"{TRAINER_STATE} (the run stopped while saving them); start afresh or give resume_from_checkpoint a path"
        )
    return None


def warn_if_tower_not_restored(tower: Any, checkpoint: str) -> bool:
    """Warn if loading ``checkpoint`` left ``tower`` fresh (its state was not in the checkpoint); True if so."""
    if tower is None or tower._tower_state is not None or not tower.height:
        return False
    initial = hyper_log_keys(tower.hyperparameters(given=True), tower.scope)  # not the ramp's probe
    saved = _last_record(os.path.join(checkpoint, TRAJECTORY_NAME))
    lost = {k: saved[k] for k in initial if saved and saved.get(k) is not None}
    what = (
        "the values it had learned (" + ", ".join(f"{k}={v:.4g}" for k, v in lost.items()) + f" at step "
        f"{saved.get('step')}, from its trajectory)"
        if lost
        else "the values it had learned"
    )
    warnings.warn(
        f"{checkpoint} has no optimizer state (optimizer.pt and scheduler.pt are both needed): the tower {tower.spec} "
        f"restarts from its initial hyperparameters (" + ", ".join(f"{k}={v:.4g}" for k, v in initial.items()) + ") "
        f"instead of {what}, and its upper levels' state is lost. Resume from a checkpoint saved with its optimizer "
        "(save_only_model=False) to continue exactly.",
        TowerNotRestoredWarning,
        stacklevel=3,
    )
    return True


def check_checkpoint_readable(checkpoint: str) -> None:
    """Raise ``ValueError`` naming ``checkpoint``'s ``trainer_state.json`` if it is missing or does not parse
    (a save that stopped halfway), before ``Trainer`` reads it with a bare ``JSONDecodeError``."""
    if not Path(checkpoint).is_dir():
        raise ValueError(f"cannot resume from {checkpoint}: it is not a folder (give a checkpoint-N folder, or True)")
    error = _unreadable_state(Path(checkpoint))
    if error is not None:
        raise ValueError(
            f"cannot resume from {checkpoint}: {TRAINER_STATE} does not read ({type(error).__name__}); the run may have "
            "stopped while saving this checkpoint. Nothing was trained or overwritten; resume from an earlier "
            "checkpoint, or with resume_from_checkpoint=True for the newest complete one"
        )


def _unreadable_state(checkpoint: Path) -> Exception | None:
    """Why ``checkpoint``'s ``trainer_state.json`` does not parse (missing, or torn by a save that stopped), or None."""
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return e
    return None


def _saved_optimizer_state(checkpoint: str) -> dict | None:
    """``checkpoint/optimizer.pt`` (on the CPU), or ``None`` if it does not read as an optimizer's state dict."""
    import torch

    try:
        state = torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any file that does not read holds no state
        return None
    return state if isinstance(state, dict) and "param_groups" in state else None


def saved_tower_spec(checkpoint: str) -> str | None:
    """The spec of the tower whose state ``checkpoint/optimizer.pt`` holds; ``None`` if it holds none or
    does not read."""
    from ..optim.state import read_tower_entry

    state = _saved_optimizer_state(checkpoint)
    try:
        found = read_tower_entry(state) if state is not None else None
    except Exception:  # noqa: BLE001 - a malformed entry names no tower
        return None
    return found[0]["spec"] if found is not None else None


def _holds_torch_optimizer_state(checkpoint: str) -> bool:
    """Whether ``checkpoint/optimizer.pt`` is a standard optimizer's state: it reads, and no trace of a tower."""
    state = _saved_optimizer_state(checkpoint)
    if state is None or "tower" in state:  # "tower": the 0.1.0 layout's entry
        return False
    return not any(isinstance(g, dict) and TOWER_GROUP_KEY in g for g in state["param_groups"])


def unreadable_checkpoint(checkpoint: str, error: Exception) -> Exception:
    """The error to raise when the optimizer state of ``checkpoint`` fails to load (``error``)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, DifferentTowerError):
        advice = (
            "start it with the tower the checkpoint names: the weight level's arguments (--learning_rate, the "
            "optimizer's betas/--optim_args, --hyper_learn) and --hyper_tower/--hyper_scope as saved"
        )
    elif _holds_torch_optimizer_state(checkpoint):
        advice = (
            "the checkpoint holds a standard optimizer's state (it was trained with a torch.optim --optim): "
            "resume it with that --optim, or start a tower from its weights (load the model from the checkpoint "
            "folder and train without resume_from_checkpoint)"
        )
    else:
        advice = "resume from an earlier checkpoint"
    message = (
        f"cannot resume from {checkpoint}: its optimizer state (optimizer.pt, scheduler.pt) does not load "
        f"({type(error).__name__}: {first[:400]}). "
        f"Nothing was trained or overwritten; {advice}"
    )
    return ValueError(message) if isinstance(error, ValueError) else RuntimeError(message)


def hyperparameters_at(
    trajectory: str | os.PathLike, step: int, like: list[dict[str, Any]], scope: str, skipped: Collection[int] = ()
) -> list[dict[str, Any]] | None:
    """The tower's hyperparameters after optimizer step ``step``, from the trajectory file, shaped like ``like``.

    Args:
        trajectory: a ``hyper_trajectory.jsonl``.
        step: the optimizer step (a checkpoint's ``N``).
        like: :meth:`TowerOptimizer.hyperparameters` of the same tower (gives the names and the layout).
        scope: the tower's scope (how per-group / per-tensor keys are suffixed).
        skipped: param groups without parameters (:func:`empty_groups`; not in the file): their values are ``like``'s.

    Returns:
        The values, or ``None`` if the file has no complete record of that step.
    """
    if not os.path.isfile(trajectory):
        return None
    record = next((r for r in salvage_trajectory(trajectory)[0] if r.get("step") == step), None)
    keys = hyper_log_keys(like, scope, skipped)
    if record is None or any(record.get(k) is None for k in keys):
        return None
    suffix = "tensor" if scope == "tensor" else "group"
    out: list[dict[str, Any]] = []
    for level, entry in enumerate(like):
        values: dict[str, Any] = {}
        for name, value in entry.items():
            key = f"hyper/{level}/{name}"
            values[name] = (
                [record[f"{key}/{suffix}{i}"] if f"{key}/{suffix}{i}" in keys else v for i, v in enumerate(value)]
                if isinstance(value, list)
                else record[key]
            )
        out.append(values)
    return out


def card_hyperparameters(
    args: Any, state: Any, tower: Any, restarted_at: int | None = None
) -> tuple[list[dict[str, Any]], str, list[str]]:
    """The hyperparameters the model card reports, the heading of their column, and notes on how they came about.

    The card describes the saved weights: with ``load_best_model_at_end`` those of the best checkpoint,
    so the values are read back from the trajectory at that checkpoint's step.
    """
    final, label, notes = tower.hyperparameters(), "final", []
    if restarted_at is not None:
        notes.append(
            f"Resumed at step {restarted_at} from a checkpoint without the optimizer state: the learned "
            "hyperparameters restarted there from their initial values (the trajectory shows the jump)"
        )
    best = state.best_model_checkpoint
    step = checkpoint_step(best) if args.load_best_model_at_end and best else None
    if step is None or step == state.global_step:
        return final, label, notes
    for path in (os.path.join(args.output_dir, TRAJECTORY_NAME), os.path.join(best, TRAJECTORY_NAME)):
        values = hyperparameters_at(path, step, final, tower.scope, empty_groups(tower))
        if values is not None:
            notes.append(
                f"Weights: the best checkpoint (step {step} of {state.global_step}, by {args.metric_for_best_model}); "
                "the hyperparameters below are those it was trained with"
            )
            return values, f"step {step} (best checkpoint)", notes
    notes.append(
        f"Weights: the best checkpoint (step {step}); its hyperparameters are not in the trajectory, so the values "
        f"below are those of the last step ({state.global_step})"
    )
    return final, label, notes


def checkpoint_step(checkpoint: str) -> int | None:
    """``N`` for a folder named ``checkpoint-N``."""
    m = _CHECKPOINT.match(Path(checkpoint).name)
    return int(m.group(1)) if m else None


def _last_record(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    records = salvage_trajectory(path)[0]
    return records[-1] if records else None
