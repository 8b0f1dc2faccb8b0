"""``python -m hf_hyperopt.launch SCRIPT.py ARGS...``: run a Hugging Face training script with tower optimizers.

The script is unmodified: it parses a stock ``TrainingArguments`` (or a TRL config, which subclasses
it) with ``HfArgumentParser`` and trains with ``Trainer`` (or a subclass such as ``SFTTrainer``).
The launcher takes ``--optim hyper_*`` and the ``--hyper_*`` flags off the command line, runs the
script with the rest, and has every ``Trainer`` the script creates train the tower those flags
describe, with the logs, trajectory file, plot and model-card section of
:class:`~hf_hyperopt.HyperTrainer`::

    python -m hf_hyperopt.launch run_clm.py --model_name_or_path gpt2 ... --optim hyper_adam
    python -m hf_hyperopt.launch run_clm.py ... --optim hyper_adam --hyper_tower "adam(lr=0.01)"
    torchrun --nproc_per_node 2 -m hf_hyperopt.launch run_clm.py ... --optim hyper_adamw
    accelerate launch -m hf_hyperopt.launch run_clm.py ... --optim hyper_adamw
    python -m hf_hyperopt.launch -m trl.scripts.sft ... --optim hyper_adamw   # a module instead of a file

Flags taken by the launcher (anywhere among the script's arguments, ``--flag value`` or ``--flag=value``):

- ``--optim hyper_sgd|hyper_adam|hyper_adamw|hyper_adagrad|hyper_rmsprop``: the weight level, with
  its initial values from the script's ``TrainingArguments`` (``--learning_rate``, ``--adam_beta1``,
  ..., ``--optim_args``), as with :class:`~hf_hyperopt.HyperTrainingArguments`. A standard
  ``--optim`` is left to the script, and then the launcher changes nothing.
- ``--hyper_tower``, ``--hyper_learn``, ``--hyper_scope``: as in ``HyperTrainingArguments``.

As with ``HyperTrainingArguments``, a tower runs a constant schedule (``constant_with_warmup`` with
warmup) unless a schedule is asked for, in which case it multiplies the learned step size: with
``--lr_scheduler_type`` on the command line, or a value other than the arguments' default that the
script's config file or code sets. The flags, and the weight level's values given on the command line
(``--learning_rate``, ``--adam_*``, ``--weight_decay``, ``--optim_args``), are checked before the script
starts; values the script sets in code, when the ``Trainer`` is created, before training.

Each ``Trainer.__init__`` in this process is wrapped to do this (``transformers`` itself is not
changed on disk, and nothing outside the launched process is affected).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import runpy
import sys
from collections.abc import Sequence

from .trainer.arguments import HYPER_OPTIMIZERS, WEIGHT_LEVEL_FIELDS, HyperSettings, check_tower_arguments

_CHOICES = ",".join(HYPER_OPTIMIZERS)
USAGE = f"""usage: python -m hf_hyperopt.launch (SCRIPT.py | -m MODULE) [SCRIPT ARGS...]
              [--optim {{{_CHOICES}}}] [--hyper_tower SPEC] [--hyper_learn NAMES] [--hyper_scope {{shared,group,tensor}}]

Runs a Hugging Face training script (stock TrainingArguments / Trainer, or TRL's) with a tower
optimizer. See docs/trainer-and-launcher.md."""

_HYPER_FLAGS = ("hyper_tower", "hyper_learn", "hyper_scope")
_SCHEDULE_FLAGS = ("--lr_scheduler_type", "--lr-scheduler-type")


def split_argv(argv: Sequence[str]) -> tuple[HyperSettings | None, list[str], bool]:
    """Take the launcher's flags out of the script's arguments.

    Returns:
        The tower settings (``None`` when ``--optim`` is not a hyper one and no ``--hyper_*`` is given),
        the arguments left for the script, and whether the script's arguments choose a schedule.

    Raises:
        ValueError: for a flag without a value, ``--hyper_*`` without a hyper ``--optim``, or settings
            that :meth:`HyperSettings.resolved` refuses.
    """
    found: dict[str, str] = {}
    seen: dict[str, str] = {}  # every value of the launcher's flags, a standard --optim too
    rest: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        key = name[2:].replace("-", "_") if name.startswith("--") else None
        if key in ("optim", *_HYPER_FLAGS):
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{name} needs a value")
                value = argv[i + 1]
            step = 1 if eq else 2
            if key in seen:
                raise ValueError(f"--{key} is given twice ({seen[key]!r} and {value!r}); give it once")
            seen[key] = value
            if key == "optim" and value not in HYPER_OPTIMIZERS:
                rest.extend(argv[i : i + step])  # a standard optimizer: the script's business
            else:
                found[key] = value
            i += step
            continue
        rest.append(arg)
        i += 1
    explicit_schedule = any(a.partition("=")[0] in _SCHEDULE_FLAGS for a in rest)
    if "optim" not in found:
        if found:
            given = ", ".join(f"--{k} {v!r}" for k, v in found.items())
            raise ValueError(
                f"{given} given without a tower optimizer; add --optim with one of {', '.join(HYPER_OPTIMIZERS)}"
            )
        return None, rest, explicit_schedule
    settings = HyperSettings(
        found["optim"], found.get("hyper_tower"), found.get("hyper_learn"), found.get("hyper_scope")
    ).resolved()
    given = weight_level_arguments(rest)
    if given is not None:  # the weight level's values as the command line gives them, before the script runs
        check_tower_arguments(given, settings)
    return settings, rest, explicit_schedule


def weight_level_arguments(argv: Sequence[str]) -> argparse.Namespace | None:
    """The ``TrainingArguments`` fields the weight level is built from, as ``argv`` gives them (defaults
    for the others), or ``None`` where a value is not a number (the script's own parser reports that)."""
    from transformers import TrainingArguments

    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    names = (*WEIGHT_LEVEL_FIELDS, "weight_decay")
    for name in names:
        parser.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, default=defaults[name])
    try:
        given, _ = parser.parse_known_args(argv)
        for name in names:
            if name != "optim_args":
                setattr(given, name, float(getattr(given, name)))
    except (argparse.ArgumentError, ValueError):  # e.g. a flag without its value
        return None
    return given


def configure_trainer(trainer, settings: HyperSettings, explicit_schedule: bool) -> None:
    """Make ``trainer`` (just created by the script) train the tower ``settings`` describe.

    Raises:
        ValueError: if the script gives the ``Trainer`` an optimizer of its own, uses
            ``HyperTrainingArguments`` already, or runs DeepSpeed.
    """
    from transformers.trainer_utils import SchedulerType

    from .trainer import HyperCallback, HyperTrainingArguments
    from .trainer.trainer import hyper_optimizer_cls_and_kwargs

    args = trainer.args
    if isinstance(args, HyperTrainingArguments):
        raise ValueError(
            "this script already uses HyperTrainingArguments, which parses --optim hyper_* itself; "
            "run it without hf_hyperopt.launch"
        )
    if trainer.optimizer is not None or trainer.optimizer_cls_and_kwargs is not None:
        raise ValueError(
            f"--optim {settings.optim} was given, but the script passes its own optimizer to the Trainer "
            "(optimizers= or optimizer_cls_and_kwargs=); drop --optim, or let the Trainer build the optimizer"
        )
    if args.deepspeed:
        raise ValueError(
            f"--optim {settings.optim} does not support DeepSpeed (deepspeed={args.deepspeed!r}): DeepSpeed "
            "replaces the optimizer step. Use FSDP (--fsdp) or DDP (torchrun) with a tower optimizer."
        )
    # Values the script set in code were not on the command line that split_argv checked.
    check_tower_arguments(args, settings)
    # Built by the Trainer's create_optimizer over its decay / no-decay param groups, as for HyperTrainer.
    trainer.optimizer_cls_and_kwargs = hyper_optimizer_cls_and_kwargs(args, settings)
    default = next(f.default for f in dataclasses.fields(args) if f.name == "lr_scheduler_type")
    chosen = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if not explicit_schedule and chosen == str(getattr(default, "value", default)):
        # The tower owns its step size (HyperTrainingArguments' default), unless a schedule was asked for: on
        # the command line, or by the script's config file or code (a value other than the default).
        warmup = (args.warmup_steps or 0) > 0 or (getattr(args, "warmup_ratio", 0) or 0) > 0
        args.lr_scheduler_type = SchedulerType.CONSTANT_WITH_WARMUP if warmup else SchedulerType.CONSTANT
    # The saved training_args.json and the card then name the optimizer that trained the model.
    args.optim = settings.optim
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, HyperCallback)]
    (found[0] if found else HyperCallback()).attach(trainer)


def install(settings: HyperSettings, explicit_schedule: bool) -> None:
    """Wrap ``transformers.Trainer.__init__`` in this process so that every ``Trainer`` trains the tower."""
    from transformers import Trainer

    original = Trainer.__init__
    if getattr(original, "_hyper_launch", False):
        raise RuntimeError("hf_hyperopt.launch is already installed in this process")

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        configure_trainer(self, settings, explicit_schedule)

    __init__._hyper_launch = True  # type: ignore[attr-defined]
    Trainer.__init__ = __init__


def main(argv: Sequence[str] | None = None) -> None:
    """Run the script named in ``argv`` (default: ``sys.argv[1:]``) as ``__main__`` with tower optimizers."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    module = None
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit(f"{USAGE}\n\nerror: -m needs a module name")
        module, script_args = argv[1], argv[2:]
    else:
        script, script_args = argv[0], argv[1:]
        if not os.path.isfile(script):
            raise SystemExit(f"{USAGE}\n\nerror: {script!r} is not a file")
    try:
        settings, rest, explicit = split_argv(script_args)
    except ValueError as e:
        raise SystemExit(f"hf_hyperopt.launch: error: {e}") from None
    if settings is not None:
        install(settings, explicit)
    if module is not None:
        sys.argv = [module, *rest]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [script, *rest]
        # As `python SCRIPT.py` does: the script's folder first on the import path.
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, run_name="__main__")
    close_process_group()


def close_process_group() -> None:
    """Destroy the default process group a finished script left open, as torch asks every program to.

    Stock scripts end without it; a rank that then exits while the group's threads still run can die in
    interpreter shutdown ("terminate called without an active exception", SIGABRT) after training
    succeeded, and the launcher reports the whole run as failed. Call it only after a run that
    succeeded: destroying the group while another rank is still inside a collective would hang.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
