"""``HyperCallback``: what a tower optimizer adds to any ``Trainer`` run, as a ``TrainerCallback``.

Give a ``Trainer`` (or ``SFTTrainer``, or any subclass) a ready tower and this callback::

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizer_cls_and_kwargs=(HyperAdam, {"lr": 1e-3}),
                      callbacks=[HyperCallback()])

and the run gets:

- ``learning_rate`` in the logs as the effective weight-level step size (the learned ``lr`` times
  the schedule's factor ``group["lr"] / group["initial_lr"]``) instead of the schedule's value;
- every level's hyperparameters as ``hyper/{level}/{name}`` at every logging step (in
  ``trainer_state.json`` and every reporter), ``/group{i}`` or ``/tensor{i}`` appended outside the
  shared scope;
- ``<output_dir>/hyper_trajectory.jsonl``, one line per optimizer step (copied into each checkpoint,
  cut back to the resumed step on resume);
- ``<output_dir>/hyper_trajectories.png`` when training ends;
- a hyperoptimizer section in ``<output_dir>/README.md`` (the model card).

Reporters (TensorBoard, W&B, ...) are called before callbacks passed as ``callbacks=``; to have them
receive the ``hyper/*`` keys too, and to keep the card section when ``trainer.create_model_card()``
or ``trainer.push_to_hub()`` rewrites the card, attach the callback instead:
``HyperCallback().attach(trainer)``. :class:`~hf_hyperopt.HyperTrainer` and ``python -m
hf_hyperopt.launch`` do that.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import has_length
from transformers.utils import logging as hf_logging

from ..optim import TowerOptimizer
from ..optim.spec import started_spec
from ..optim.stepping import schedule_factor
from ..unwrap import find_tower
from .model_card import add_hyper_section, hyper_section
from .plotting import plot_trajectories
from .resume import card_hyperparameters, warn_if_tower_not_restored
from .trajectory import (
    TRAJECTORY_NAME,
    TrajectoryWriter,
    empty_groups,
    hyper_log_keys,
    read_trajectory,
    without_empty_groups,
)

logger = logging.getLogger(__name__)
# The Trainer's own start-of-training lines ("***** Running training *****") go to this logger, which
# transformers' example scripts turn on (set_verbosity_info) while leaving Python's root logger at WARNING.
_trainer_logger = hf_logging.get_logger("transformers.trainer")

PLOT_NAME = "hyper_trajectories.png"
CARD_NAME = "README.md"
# A learned lr this many times below the largest it has held: the weights have all but stopped moving.
STALLED_BELOW_PEAK = 1e-4


def _info(msg: str, *args: Any) -> None:
    """Log ``msg`` where the script shows INFO lines: Python's logging if it is on for us, else transformers'.

    transformers' loggers do not propagate to the root logger, and scripts turn on one or the other
    (``logging.basicConfig(level=INFO)``, or ``transformers.utils.logging.set_verbosity_info()``);
    logging on just one of the two hides the line from half of them, on both doubles it.
    """
    (logger if logger.isEnabledFor(logging.INFO) else _trainer_logger).info(msg, *args)


def effective_learning_rate(tower: TowerOptimizer, schedule_lr: float | None = None) -> float:
    """The weight-level step size of the first param group with parameters: the learned ``lr`` times the
    schedule's factor (group 0's, as the ``Trainer`` logs it).

    A schedule rewrites ``group["lr"]``; the tower reads it as the factor ``group["lr"] /
    group["initial_lr"]`` on its learned step size (:meth:`~hf_hyperopt.optim.engine.TowerOptimizer.schedule_base`).
    Without a learned ``lr`` it is the schedule's value.

    Args:
        tower: the tower.
        schedule_lr: the schedule's value for the step of interest; by default ``group["lr"]`` now
            (between ``optimizer.step()`` and ``lr_scheduler.step()``: the step just taken). The
            ``Trainer`` logs the value of the step just taken after the schedule has moved on.
    """
    group = tower.param_groups[0]
    scheduled = float(group["lr"] if schedule_lr is None else schedule_lr)
    if not tower.height or "lr" not in tower.learned()[0]:
        return scheduled
    lr = tower.hyperparameters()[0]["lr"]
    # Per group (or tensor): the first that moves weights (BitFit leaves HF's weight-decay group 0 empty).
    empty = empty_groups(tower)
    learned = float(lr[min(set(range(len(lr))) - empty, default=0)] if isinstance(lr, list) else lr)
    return learned * schedule_factor(scheduled, tower.schedule_base(0))


def run_horizon(args: Any, state: Any, train_dataloader: Any = None) -> int:
    """The optimizer steps of one pass through the training data, counted as transformers 5 counts
    ``num_update_steps_per_epoch``, or of the whole run where that is shorter or the data has no length
    (a stream: no epochs). ``HyperTrainer`` hands the callback the ``Trainer``'s own count instead."""
    batches = len(train_dataloader) if train_dataloader is not None and has_length(train_dataloader) else 0
    accumulation = max(int(getattr(args, "gradient_accumulation_steps", 1) or 1), 1)
    per_epoch = -(-batches // accumulation) if batches else state.max_steps
    return max(1, min(per_epoch, state.max_steps))


def hyper_logs(tower: TowerOptimizer, schedule_lr: float | None = None) -> dict[str, float]:
    """``learning_rate`` (effective, see :func:`effective_learning_rate`) and every ``hyper/{level}/{name}``, now."""
    lr = effective_learning_rate(tower, schedule_lr)
    return {"learning_rate": lr, **hyper_log_keys(tower.hyperparameters(), tower.scope, empty_groups(tower))}


def _initial_from_config(tower: TowerOptimizer) -> list[dict[str, float | list[float]]]:
    """Each level's starting values of what it learns, from the tower's configuration (for resumed runs):
    at level 0 one per unit, as :meth:`TowerOptimizer.hyperparameters` reports them (a list in the group
    and tensor scopes), from the param groups' initial values."""
    out: list[dict[str, float | list[float]]] = []
    for k, cfg in enumerate(tower.levels):
        names = tower.learned()[k] if k < tower.height else (cfg.learn or ("lr",))
        if k == 0 and tower.height:
            units = tower._level0_unit_values()
            out.append({name: units[name][0] if tower.scope == "shared" else units[name] for name in names})
        else:
            values = cfg.full_values()
            out.append({name: values[name] for name in names})
    return out


class HyperCallback(TrainerCallback):
    """Logs, trajectory file, plot and model-card section for a ``Trainer`` that trains a tower optimizer.

    Does nothing when the optimizer holds no tower, so it can be added to every run.

    Args:
        plot: draw ``hyper_trajectories.png`` when training ends.
        card: write the hyperoptimizer section into ``<output_dir>/README.md`` when training ends.

    Attributes:
        tower: the tower being trained (set when training begins), or ``None``.
        initial: every level's learned values before the first step.
        resumed_from: the checkpoint the run resumed from, if known (set when attached, see
            :meth:`attach`); otherwise ``<output_dir>/checkpoint-<step>`` is assumed, the ``Trainer``'s layout.
        horizon: the steps a ``trace=auto`` spans, as the ``Trainer`` counted them (``HyperTrainer`` sets
            it); otherwise :func:`run_horizon` counts them from the dataloader.
    """

    def __init__(self, plot: bool = True, card: bool = True):
        self.plot = plot
        self.card = card
        self.tower: TowerOptimizer | None = None
        self.initial: list[dict[str, float | list[float]]] | None = None
        self.resumed_from: str | None = None
        # The step at which a resume without the tower's state restarted the learned values (HyperTrainer sets it).
        self.restarted_at: int | None = None
        self._writer: TrajectoryWriter | None = None
        self._lr_peak: tuple[float, int] = (0.0, 0)  # the largest learned lr logged, and its step
        self._stall_warned = False
        # min(num_update_steps_per_epoch, max_steps) as the Trainer counted them (HyperTrainer sets it).
        self.horizon: int | None = None

    # ------------------------------------------------------------------ attaching
    def attach(self, trainer: Any) -> HyperCallback:
        """Put this callback first on ``trainer``, keep its card section when the card is rewritten, and
        note which checkpoint a run resumes from.

        First, so that the reporters that come with ``report_to`` receive the ``hyper/*`` keys and the
        effective ``learning_rate``; ``trainer.create_model_card`` (which ``push_to_hub`` calls and
        which rewrites ``README.md``) is wrapped on this ``trainer`` instance only, to add the section
        back; so is ``trainer.train``, to learn ``resume_from_checkpoint`` (the trajectory up to it is
        read from there, wherever it is). Attaching twice is harmless, and a trainer has one: attaching
        another returns the one it has (two would rewrite ``learning_rate`` twice and write every line twice).

        Returns:
            This callback, or the one ``trainer`` already has.
        """
        callbacks = trainer.callback_handler.callbacks
        present = next((cb for cb in callbacks if isinstance(cb, HyperCallback) and cb is not self), None)
        if present is not None:
            return present.attach(trainer)
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        create = trainer.create_model_card
        if getattr(create, "_hyper_callback", None) is not self:

            @functools.wraps(create)
            def create_model_card(*args, **kwargs):
                create(*args, **kwargs)
                if trainer.is_world_process_zero():
                    self.write_card_section(trainer.args, trainer.state)

            create_model_card._hyper_callback = self  # type: ignore[attr-defined]
            trainer.create_model_card = create_model_card
        train = trainer.train
        if getattr(train, "_hyper_callback", None) is not self:

            @functools.wraps(train)
            def train_and_note_checkpoint(resume_from_checkpoint=None, *args, **kwargs):
                # The checkpoint a plain Trainer resumes from is not passed to callbacks: note a path given here
                # (True is output_dir/checkpoint-<step>, which on_train_begin assumes; HyperTrainer sets it again
                # once loaded).
                self.resumed_from, self.restarted_at = None, None
                if isinstance(resume_from_checkpoint, (str, os.PathLike)):
                    self.resumed_from = os.fspath(resume_from_checkpoint)
                return train(resume_from_checkpoint, *args, **kwargs)

            train_and_note_checkpoint._hyper_callback = self  # type: ignore[attr-defined]
            trainer.train = train_and_note_checkpoint
        return self

    # ------------------------------------------------------------------ the card
    def write_card_section(self, args: Any, state: Any) -> None:
        """Add (or replace) the hyperoptimizer section of the model card in ``args.output_dir``.

        The card describes the saved weights: with ``load_best_model_at_end`` the hyperparameters are
        those of the best checkpoint, read back from the trajectory.
        """
        t = self.tower
        if t is None:
            return
        output_dir = args.output_dir
        plot = PLOT_NAME if os.path.isfile(os.path.join(output_dir, PLOT_NAME)) else None
        final, label, notes = card_hyperparameters(args, state, t, self.restarted_at)
        initial = self.initial or t.hyperparameters()
        empty = empty_groups(t)
        if empty:
            initial, final = without_empty_groups(initial, empty), without_empty_groups(final, empty)
            groups = ", ".join(map(str, sorted(empty)))
            notes = [*notes, f"Param groups without parameters (left out): {groups}"]
        section = hyper_section(
            started_spec(t),
            t.scope,
            initial,
            final,
            plot=plot,
            steps=state.global_step,
            final_label=label,
            notes=notes,
        )
        add_hyper_section(os.path.join(output_dir, CARD_NAME), section)

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.tower = find_tower(optimizer)
        self._writer = None
        self._lr_peak, self._stall_warned = (0.0, 0), False
        t = self.tower
        if t is None:
            return
        # One callback a run (a second, from trainer.add_callback, would rewrite learning_rate again and write
        # every trajectory line twice): the first to start this run's state does the work, the others nothing.
        owner = state.__dict__.setdefault("_hf_hyperopt_callback", self)
        if owner is not self:
            self.tower = None
            if state.is_world_process_zero and args.process_index == 0:
                _trainer_logger.warning("hf_hyperopt: this Trainer has two HyperCallbacks; the second does nothing")
            return
        # trace=auto spans one pass through the data: set on every start and resume, before the first step
        # (a horizon set on a ready tower is replaced: the run's is the Trainer's to count).
        if t.uses_horizon:
            t.set_horizon(self.horizon or run_horizon(args, state, kwargs.get("train_dataloader")))
        # The checkpoint resumed from: HyperTrainer names it; a plain Trainer's is found by its step.
        ckpt = self.resumed_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.global_step > 0 and self.restarted_at is None:
            # Resumed by a plain Trainer (HyperTrainer has checked already): a tower still fresh had no
            # optimizer state to load.
            if warn_if_tower_not_restored(t, ckpt):
                self.restarted_at = state.global_step
        if state.global_step == 0:
            self.initial = t.hyperparameters(given=True)
        elif self.initial is None:
            # Resumed, and nobody recorded the start (HyperTrainer does, before loading the checkpoint).
            self.initial = _initial_from_config(t)
        # TrainerState.is_world_process_zero is reset to True when train() starts (transformers 5.x), so
        # ask the arguments, as Trainer.is_world_process_zero does.
        if not (state.is_world_process_zero and args.process_index == 0):
            return
        _info("hf_hyperopt: training with the tower %s (scope=%s)", started_spec(t), t.scope)
        if t.uses_horizon:
            _info("hf_hyperopt: trace=auto spans %d optimizer steps (one epoch, or the run if shorter)", t.horizon)
        path = os.path.join(args.output_dir, TRAJECTORY_NAME)
        source = os.path.join(ckpt, TRAJECTORY_NAME) if state.global_step > 0 else None
        self._writer = TrajectoryWriter(path)
        # What the resumed tower holds, to tell the run's own trajectory from another run's.
        restored = (
            hyper_log_keys(t.hyperparameters(), t.scope, empty_groups(t))
            if state.global_step > 0 and self.restarted_at is None
            else None
        )
        self._writer.start(resume_step=state.global_step, source=source, resumed=restored)

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Called after optimizer.step() and before the schedule steps and global_step counts the step.
        if self._writer is not None:
            self._writer.write({"step": state.global_step + 1, **hyper_logs(self.tower)})

    def on_log(self, args, state, control, logs=None, **kwargs):
        # "learning_rate" is in the logs exactly at the training logging steps.
        if self.tower is None or logs is None or "learning_rate" not in logs:
            return
        extra = hyper_logs(self.tower, schedule_lr=logs["learning_rate"])
        logs.update(extra)
        lrs = [v for k, v in extra.items() if k == "hyper/0/lr" or k.startswith("hyper/0/lr/")]
        if lrs and args.process_index == 0:
            self._warn_if_stalled(max(lrs), state.global_step)
        # The Trainer appended a copy of these logs to the history before calling the callbacks.
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last is not logs and "learning_rate" in last and last.get("step") == state.global_step:
            last.update(extra)

    def _warn_if_stalled(self, lr: float, step: int) -> None:
        """Say once a run when the learned lr (the largest unit's, without the schedule's factor) has fallen
        ``1 / STALLED_BELOW_PEAK`` times below the largest it has held: the run goes on, but no longer trains."""
        if lr > self._lr_peak[0]:
            self._lr_peak = (lr, step)
        peak, at = self._lr_peak
        if self._stall_warned or not lr < STALLED_BELOW_PEAK * peak:
            return
        self._stall_warned = True
        _trainer_logger.warning(
            "hf_hyperopt: at step %d the learned lr is %.3g, over %.0f times below the %.3g it held at step %d: "
            "the weights have all but stopped moving. Over long runs a greedy hypergradient lowers the lr early, "
            "and with batches drawn in epochs it can lower it without end (docs/optimizers.md, 'Long runs').",
            step,
            lr,
            1 / STALLED_BELOW_PEAK,
            peak,
            at,
        )

    def on_save(self, args, state, control, **kwargs):
        # The checkpoint carries the trajectory up to its step, so that it can be resumed elsewhere.
        src = os.path.join(args.output_dir, TRAJECTORY_NAME)
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self._writer is not None and os.path.isfile(src) and os.path.isdir(ckpt):
            shutil.copyfile(src, os.path.join(ckpt, TRAJECTORY_NAME))

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        path = os.path.join(args.output_dir, TRAJECTORY_NAME)
        if self.plot and read_trajectory(path):
            # The spec as the title: as a legend label it was wider than a panel and squeezed the axes.
            plot_trajectories([path], os.path.join(args.output_dir, PLOT_NAME), title=started_spec(self.tower))
        if self.card:
            self.write_card_section(args, state)
