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
gets the same logging, trajectory, plot and model card. The logs, trajectory, plot and card come from
:class:`~hf_hyperopt.HyperCallback`, which any ``Trainer`` can use; this class adds building the tower
from the arguments and the constant schedule.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.optimization import get_scheduler

from ..optim import OPTIMIZERS, TowerOptimizer
from ..unwrap import find_tower
from .arguments import HyperOptimizerNames, HyperSettings, HyperTrainingArguments, is_hyper_optim, weight_level_values
from .callback import HyperCallback, hyper_logs
from .resume import (
    check_checkpoint_readable,
    checkpoint_step,
    last_complete_checkpoint,
    saved_tower_spec,
    unreadable_checkpoint,
    warn_if_tower_not_restored,
)

logger = logging.getLogger(__name__)

_CONSTANT = ("constant", "constant_with_warmup")


def unwrap_tower(optimizer: Any) -> TowerOptimizer | None:
    """The tower inside ``optimizer`` (through Accelerate's wrappers), or ``None`` if there is none."""
    return find_tower(optimizer)


def hyper_optimizer_cls_and_kwargs(
    args: TrainingArguments, settings: HyperSettings | None = None
) -> tuple[type[TowerOptimizer], dict[str, Any]]:
    """The tower class and keyword arguments that ``args`` describe.

    Args:
        args: the weight level's values (``learning_rate``, ``adam_*``, ``optim_args``, ``weight_decay``).
        settings: ``optim`` and the ``hyper_*`` settings; by default ``args.hyper_settings`` (``args`` a
            :class:`HyperTrainingArguments` with a hyper ``optim``).

    The param groups' ``weight_decay`` (set by ``Trainer``) overrides the ``weight_decay`` given here.
    """
    s = (settings if settings is not None else args.hyper_settings).resolved()  # type: ignore[attr-defined]
    values = weight_level_values(args, s.optim)
    kwargs: dict[str, Any] = {"lr": values.pop("lr"), "weight_decay": float(args.weight_decay)}
    if "beta1" in values:
        kwargs["betas"] = (values.pop("beta1"), values.pop("beta2"))
    if "nesterov" in values:
        kwargs["nesterov"] = bool(values.pop("nesterov"))
    kwargs.update(values)
    kwargs.update(learn=s.learn, scope=s.scope, hyper=s.tower)
    return OPTIMIZERS[HyperOptimizerNames(s.optim).rule_name], kwargs


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
        super().__init__(model, args, *pargs, **kwargs)
        # One implementation of the logs, trajectory, plot and card: the callback any Trainer can use
        # (a HyperCallback passed in callbacks= is the one used).
        given = [cb for cb in self.callback_handler.callbacks if isinstance(cb, HyperCallback)]
        for extra in given[1:]:
            self.callback_handler.callbacks.remove(extra)
        self._hyper_callback = (given[0] if given else HyperCallback()).attach(self)

    # ------------------------------------------------------------------ the tower
    @property
    def tower(self) -> TowerOptimizer | None:
        """The tower optimizer being trained, or ``None`` (not built yet, or a standard optimizer)."""
        return unwrap_tower(self.optimizer)

    def hyper_logs(self) -> dict[str, float]:
        """``learning_rate`` (effective) and every level's ``hyper/{level}/{name}`` values, now."""
        t = self.tower
        return hyper_logs(t) if t is not None else {}

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: TrainingArguments, model=None) -> tuple[Any, Any]:
        if is_hyper_optim(args.optim):
            return hyper_optimizer_cls_and_kwargs(args)  # type: ignore[arg-type]
        return Trainer.get_optimizer_cls_and_kwargs(args, model)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        t = unwrap_tower(optimizer)
        if t is not None and self._hyper_callback.initial is None:
            # Before a checkpoint is loaded into it: the values the run started from.
            self._hyper_callback.initial = t.hyperparameters(given=True)
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

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:
            # The newest checkpoint, if a killed save left it incomplete, would resume from step 0 or without
            # the tower's state: take the newest complete one.
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir) or resume_from_checkpoint
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            check_checkpoint_readable(str(resume_from_checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, *args, **kwargs):
        epochs_trained, steps = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, *args, **kwargs
        )
        # trace=auto's horizon, counted as the Trainer counts its epochs (with its version's rounding).
        self._hyper_callback.horizon = max(1, min(num_update_steps_per_epoch, max_steps))
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
            if checkpoint is None:
                raise
            if self.tower is None:
                # torch.optim reads a tower's state dict as its own and fails deep inside (KeyError: 'step').
                spec = saved_tower_spec(checkpoint)
                if spec is None:
                    raise
                optim = getattr(self.args.optim, "value", self.args.optim)
                raise ValueError(
                    f"cannot resume from {checkpoint} with --optim {optim}: its optimizer state is that of "
                    f"a tower optimizer ({spec}). Nothing was trained or overwritten; resume with the --optim "
                    "hyper_* and --hyper_tower it was saved with, or start this optimizer afresh without "
                    "resume_from_checkpoint"
                ) from e
            raise unreadable_checkpoint(checkpoint, e) from e
        self._hyper_callback.resumed_from = checkpoint
        if checkpoint is not None and warn_if_tower_not_restored(self.tower, checkpoint):
            self._hyper_callback.restarted_at = checkpoint_step(checkpoint)
