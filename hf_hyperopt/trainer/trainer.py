"""``HyperTrainer``: the ``transformers.Trainer`` with tower optimizers and their trajectories.

``HyperTrainer(model=..., args=HyperTrainingArguments(optim="hyper_adam", ...), ...)`` trains like
``Trainer`` and, with a tower optimizer:

- builds the tower in ``create_optimizer`` over the ``Trainer``'s decay / no-decay param groups;
- runs a constant schedule unless one was asked for, in which case the schedule multiplies the
  learned step size;
- logs every level's hyperparameters as ``hyper/{level}/{name}`` (``/group{i}`` or ``/tensor{i}``
  appended outside the shared scope) at every logging step, and ``learning_rate`` as the effective
  weight-level step size (learned ``lr`` times the schedule's factor);
- appends every optimizer step to ``<output_dir>/hyper_trajectory.jsonl`` (copied into each checkpoint
  and cut back to the resumed step on resume), and draws ``<output_dir>/hyper_trajectories.png`` when
  training ends;
- adds a hyperoptimizer section to the model card.

With a plain ``TrainingArguments`` and a standard ``optim`` it is ``Trainer``. A ready tower can also
be given through ``optimizers=`` or ``optimizer_cls_and_kwargs=`` (with a standard ``optim``); it then
gets the same logging, trajectory, plot and model card.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.optimization import get_scheduler

from ..optim import OPTIMIZERS, TowerOptimizer
from .arguments import HyperOptimizerNames, HyperTrainingArguments, is_hyper_optim
from .model_card import add_hyper_section, hyper_section
from .plotting import plot_trajectories
from .resume import (
    card_hyperparameters,
    checkpoint_step,
    last_complete_checkpoint,
    unreadable_checkpoint,
    warn_if_tower_not_restored,
)
from .trajectory import TRAJECTORY_NAME, TrajectoryWriter, hyper_log_keys, read_trajectory

logger = logging.getLogger(__name__)

PLOT_NAME = "hyper_trajectories.png"
_CONSTANT = ("constant", "constant_with_warmup")


def unwrap_tower(optimizer: Any) -> TowerOptimizer | None:
    """The tower inside ``optimizer`` (through Accelerate's wrappers), or ``None`` if there is none."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, TowerOptimizer) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, TowerOptimizer) else None


def hyper_optimizer_cls_and_kwargs(args: HyperTrainingArguments) -> tuple[type[TowerOptimizer], dict[str, Any]]:
    """The tower class and keyword arguments that ``args`` describe (``optim`` must be a hyper one).

    The param groups' ``weight_decay`` (set by ``Trainer``) overrides the ``weight_decay`` given here.
    """
    name = HyperOptimizerNames(str(args.optim)).rule_name
    values = args.hyper_weight_values()
    kwargs: dict[str, Any] = {"lr": values.pop("lr"), "weight_decay": float(args.weight_decay)}
    if "beta1" in values:
        kwargs["betas"] = (values.pop("beta1"), values.pop("beta2"))
    if "nesterov" in values:
        kwargs["nesterov"] = bool(values.pop("nesterov"))
    kwargs.update(values)
    kwargs.update(learn=args.hyper_learn, scope=args.hyper_scope, hyper=args.hyper_tower)
    return OPTIMIZERS[name], kwargs


class _HyperCallback(TrainerCallback):
    """Writes the trajectory file every optimizer step and draws the plot when training ends."""

    def __init__(self, trainer: HyperTrainer):
        self.trainer = trainer
        self.writer: TrajectoryWriter | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        tr = self.trainer
        self.writer = None
        if unwrap_tower(tr.optimizer) is None or not state.is_world_process_zero:
            return
        self.writer = TrajectoryWriter(os.path.join(args.output_dir, TRAJECTORY_NAME))
        ckpt = tr._hyper_resumed_from
        source = os.path.join(ckpt, TRAJECTORY_NAME) if ckpt else None
        self.writer.start(resume_step=state.global_step, source=source)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.writer is None:
            return
        record = {"step": state.global_step + 1, **self.trainer.hyper_logs()}
        self.writer.write(record)

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        path = os.path.join(args.output_dir, TRAJECTORY_NAME)
        if read_trajectory(path):
            plot_trajectories([path], os.path.join(args.output_dir, PLOT_NAME), labels=[self.trainer.hyper_spec()])


class HyperTrainer(Trainer):
    """A ``Trainer`` that builds, schedules, logs, checkpoints and documents tower optimizers.

    Args:
        model, args, ...: as for ``transformers.Trainer``. ``args`` is a
            :class:`~hf_hyperopt.HyperTrainingArguments` to select a tower with ``optim="hyper_*"``;
            ``None`` gives ``HyperTrainingArguments(output_dir="trainer_output")`` (``hyper_adamw``).
        optimizers, optimizer_cls_and_kwargs: as for ``Trainer``; either may hold a ready tower
            (e.g. ``(HyperAdam, {"lr": 1e-3, "hyper": "sgd(lr=1e-5)"})``) when ``optim`` is a standard
            one. Its schedule: constant unless one was asked for when ``args`` is a
            ``HyperTrainingArguments``; with a plain ``TrainingArguments`` (which cannot tell a default
            ``linear`` from a chosen one) its ``lr_scheduler_type``, multiplying the learned step size.

    Raises:
        ValueError: before anything is trained, if ``optimizers=`` or ``optimizer_cls_and_kwargs=``
            is combined with a hyper ``optim`` (the tower would be built twice), or if a tower is to
            run under DeepSpeed.
    """

    def __init__(self, model=None, args: TrainingArguments | None = None, *pargs, **kwargs):
        if args is None:
            args = HyperTrainingArguments(output_dir="trainer_output")
        bound = inspect.signature(Trainer.__init__).bind_partial(None, model, args, *pargs, **kwargs).arguments
        optimizers = bound.get("optimizers") or (None, None)
        cls_and_kwargs = bound.get("optimizer_cls_and_kwargs")
        if is_hyper_optim(args.optim):
            if optimizers[0] is not None or optimizers[1] is not None:
                raise ValueError(
                    f"optimizers= was given together with optim={str(args.optim)!r}, which builds a tower optimizer "
                    "itself; pass a ready optimizer with a standard optim (e.g. 'adamw_torch'), or drop optimizers="
                )
            if cls_and_kwargs is not None:
                raise ValueError(
                    f"optimizer_cls_and_kwargs= was given together with optim={str(args.optim)!r}, which builds a "
                    "tower optimizer itself; use one or the other"
                )
        ready = optimizers[0] is not None and unwrap_tower(optimizers[0]) is not None
        ready = ready or (
            cls_and_kwargs is not None
            and isinstance(cls_and_kwargs[0], type)
            and issubclass(cls_and_kwargs[0], TowerOptimizer)
        )
        if (is_hyper_optim(args.optim) or ready) and args.deepspeed:
            raise ValueError(
                "tower optimizers do not support DeepSpeed (it replaces the optimizer step); "
                "use FSDP (--fsdp) or DDP (torchrun)"
            )
        self._hyper_resumed_from: str | None = None
        self._hyper_restarted_at: int | None = None  # the step a resume without the tower's state restarted at
        self._hyper_initial: list[dict[str, Any]] | None = None
        super().__init__(model, args, *pargs, **kwargs)
        self._hyper_callback = _HyperCallback(self)
        self.add_callback(self._hyper_callback)

    # ------------------------------------------------------------------ the tower
    @property
    def tower(self) -> TowerOptimizer | None:
        """The tower optimizer being trained, or ``None`` (not built yet, or a standard optimizer)."""
        return unwrap_tower(self.optimizer)

    def hyper_spec(self) -> str:
        t = self.tower
        return t.spec if t is not None else ""

    def hyper_logs(self) -> dict[str, float]:
        """``learning_rate`` (effective) and every level's ``hyper/{level}/{name}`` values, now."""
        t = self.tower
        if t is None:
            return {}
        return {"learning_rate": self._get_learning_rate(), **hyper_log_keys(t.hyperparameters(), t.scope)}

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: TrainingArguments, model=None) -> tuple[Any, Any]:
        if is_hyper_optim(args.optim):
            return hyper_optimizer_cls_and_kwargs(args)  # type: ignore[arg-type]
        return Trainer.get_optimizer_cls_and_kwargs(args, model)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        t = unwrap_tower(optimizer)
        if t is not None and self._hyper_initial is None:
            self._hyper_initial = t.hyperparameters()
            logger.info("hf_hyperopt: training with the tower %s (scope=%s)", t.spec, t.scope)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        # A tower owns its step size: unless a schedule was asked for explicitly, run a constant one
        # (with warmup if warmup was asked for). An explicit schedule rewrites group["lr"], which the
        # tower reads as a factor group["lr"] / group["initial_lr"] on the learned step size.
        explicit = getattr(self.args, "lr_scheduler_explicit", True)
        tower = unwrap_tower(optimizer if optimizer is not None else self.optimizer)
        if self.lr_scheduler is None and tower is not None and not explicit:
            kind = "constant_with_warmup" if self.args.get_warmup_steps(num_training_steps) > 0 else "constant"
            if str(getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)) not in _CONSTANT:
                logger.info("hf_hyperopt: a tower optimizer with no schedule asked for runs a %s schedule", kind)
            self.lr_scheduler = get_scheduler(
                kind,
                optimizer=optimizer if optimizer is not None else self.optimizer,
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
                num_training_steps=num_training_steps,
            )
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def _get_learning_rate(self) -> float:
        """The effective weight-level step size of the step just taken (param group 0)."""
        t = self.tower
        if t is None or not t.height or "lr" not in t.learned()[0]:
            return super()._get_learning_rate()
        lr = t.hyperparameters()[0]["lr"]
        lr0 = float(lr[0] if isinstance(lr, list) else lr)
        group = t.param_groups[0]
        factor = group["lr"] / group["initial_lr"] if group.get("initial_lr") else 1.0
        return lr0 * float(factor)

    # ------------------------------------------------------------------ logs, checkpoints, card
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # "learning_rate" is in the logs exactly at the training logging steps.
        t = self.tower
        if t is not None and t.height and "learning_rate" in logs:
            logs.update(hyper_log_keys(t.hyperparameters(), t.scope))
        super().log(logs, start_time)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        src = os.path.join(self.args.output_dir, TRAJECTORY_NAME)
        if self.tower is not None and self.args.should_save and os.path.isfile(src):
            # The checkpoint carries the trajectory up to its step, so it can be resumed elsewhere.
            shutil.copyfile(src, os.path.join(output_dir, TRAJECTORY_NAME))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:
            # The newest checkpoint, if a killed save left it incomplete, would resume from step 0 or without
            # the tower's state: take the newest complete one.
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir) or resume_from_checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, *args, **kwargs):
        epochs_trained, steps = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, *args, **kwargs
        )
        if max_steps > 0 and self.state.global_step >= max_steps:
            # Resumed from the last checkpoint of a finished run (killed before it returned). Trainer would
            # re-enter the unfinished epoch and take one step more than max_steps: there is nothing left to train.
            logger.info(
                "hf_hyperopt: resumed at step %d of %d: nothing left to train", self.state.global_step, max_steps
            )
            epochs_trained = num_train_epochs
        return epochs_trained, steps

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except Exception as e:  # noqa: BLE001 - a damaged optimizer.pt: one error naming the checkpoint
            if checkpoint is None or self.tower is None:
                raise
            raise unreadable_checkpoint(checkpoint, e) from e
        self._hyper_resumed_from = checkpoint
        if checkpoint is not None and warn_if_tower_not_restored(self.tower, checkpoint):
            self._hyper_restarted_at = checkpoint_step(checkpoint)

    def create_model_card(self, *args, **kwargs) -> None:
        super().create_model_card(*args, **kwargs)
        t = self.tower
        if t is None or not self.is_world_process_zero():
            return
        plot = PLOT_NAME if os.path.isfile(os.path.join(self.args.output_dir, PLOT_NAME)) else None
        final, label, notes = card_hyperparameters(self, t)
        section = hyper_section(
            t.spec,
            t.scope,
            self._hyper_initial or t.hyperparameters(),
            final,
            plot=plot,
            steps=self.state.global_step,
            final_label=label,
            notes=notes,
        )
        add_hyper_section(os.path.join(self.args.output_dir, "README.md"), section)
