"""``HyperTrainingArguments``: ``TrainingArguments`` that also accept the tower optimizers.

``--optim hyper_adam`` (or ``hyper_sgd``, ``hyper_adamw``, ``hyper_adagrad``, ``hyper_rmsprop``) makes
the weight level that optimizer, with its initial values taken from the usual arguments, and puts the
tower ``--hyper_tower`` above it; ``--hyper_learn`` and ``--hyper_scope`` say what is learned and how
finely. Every standard ``--optim`` keeps its ``transformers`` meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames

from ..levels import RULES
from ..optim import SCOPES, parse_spec, tower
from ..optim.optimizers import default_hyper


class HyperOptimizerNames(str, Enum):
    """The ``--optim`` values that select a tower optimizer; the weight level is the named algorithm."""

    HYPER_SGD = "hyper_sgd"
    HYPER_ADAM = "hyper_adam"
    HYPER_ADAMW = "hyper_adamw"
    HYPER_ADAGRAD = "hyper_adagrad"
    HYPER_RMSPROP = "hyper_rmsprop"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def rule_name(self) -> str:
        """The weight level's name in spec strings (``"adam"`` for ``hyper_adam``)."""
        return self.value.removeprefix("hyper_")


HYPER_OPTIMIZERS: tuple[str, ...] = tuple(m.value for m in HyperOptimizerNames)
ALL_OPTIMIZERS: tuple[str, ...] = (*(m.value for m in OptimizerNames), *HYPER_OPTIMIZERS)

# What --optim_args may set for each weight level (the rest come from the usual arguments), and the
# torch.optim options this project's levels do not implement, with the only value they accept.
_OPTIM_ARGS: dict[str, tuple[str, ...]] = {
    "sgd": ("momentum", "nesterov"),
    "adam": (),
    "adamw": (),
    "adagrad": ("eps",),
    "rmsprop": ("alpha", "eps"),
}
_UNSUPPORTED_OPTIM_ARGS: dict[str, dict[str, str]] = {
    "sgd": {"dampening": "0"},
    "adagrad": {"lr_decay": "0"},
    "rmsprop": {"momentum": "0", "centered": "false"},
}
_FALSE = ("false", "0", "no")
_TRUE = ("true", "1", "yes")


class ChosenDefault(str):
    """A value :class:`HyperTrainingArguments` filled in because none was given (the schedule, the
    ``hyper_*`` settings). It reads as the plain string, and marks the value as not the user's:
    ``dataclasses.replace(args, ...)`` and ``HyperTrainingArguments(**args.to_dict())`` hand it to the
    new arguments, which choose afresh for their own ``optim`` and warm-up instead of taking the old
    choice as given."""

    __slots__ = ()

    @property
    def value(self) -> str:
        """The plain string, as the ``SchedulerType`` member would give it (``transformers`` reads ``.value``)."""
        return str(self)


_HYPER_FIELDS = ("hyper_tower", "hyper_learn", "hyper_scope")
# What set_optimizer sets besides ``optim`` (whose assignment chooses the tower settings and schedule afresh).
_SET_OPTIMIZER_FIELDS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim_args")


def is_hyper_optim(optim: object) -> bool:
    """Whether ``optim`` (a string or enum member) names a tower optimizer."""
    return str(getattr(optim, "value", optim)) in HYPER_OPTIMIZERS


@dataclass
class HyperTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the tower optimizers and their settings.

    With ``optim`` one of ``hyper_sgd``, ``hyper_adam``, ``hyper_adamw``, ``hyper_adagrad`` or
    ``hyper_rmsprop``, :class:`~hf_hyperopt.HyperTrainer` trains with the tower::

        <weight level from the usual arguments>/<hyper_tower>

    e.g. ``adam(lr=5e-05,beta1=0.9,beta2=0.999,eps=1e-08,learn=lr)/adam(lr=0.05,beta1=0.0,trace=auto,ramp=0.001,normalize=true,ramp_search=0.3,timescale=100)``. The weight level takes
    ``learning_rate -> lr``, ``adam_beta1/adam_beta2 -> beta1/beta2`` and ``adam_epsilon -> eps``
    (Adam, AdamW), ``weight_decay`` for the decay param group (biases and norms get 0, as in
    ``Trainer``), and the rest through ``optim_args`` as ``transformers`` does: SGD's
    ``momentum``/``nesterov``, AdaGrad's ``eps``, RMSProp's ``alpha``/``eps``.

    Defaults that differ from ``TrainingArguments``, and why:

    - ``optim="hyper_adamw"``: the ``Trainer``'s default algorithm (AdamW), with its step size learned.
      Any standard ``OptimizerNames`` value still works and then nothing is learned.
    - ``hyper_tower=None`` resolves to ``hf_hyperopt.DEFAULT_HYPER["default"]``: an Adam level that
      learns ``log(lr)`` from the slope of the loss along the last update (``normalize=true``), so
      the step size moves by a bounded fraction per step whatever its scale, after a ramp
      (``ramp=0.001``) that starts the step size where one step moves the weights by 0.1% of their
      norm: a ``learning_rate`` above that never takes a step, one below it doubles up to it; from
      there it keeps doubling while the next gradient still points along the last update
      (``ramp_search=0.3``), which ended at once on the transformers measured with Adam (it runs with SGD
      on the weights); after its first 100 steps the level's own step shrinks as ``sqrt(100 / t)``
      (``timescale=100``), so that over a long run it does not anneal the lr early. It learns from the
      hypergradient of the lr held over one pass through the training data (``trace=auto``: the
      callback sets the horizon to the optimizer steps of an epoch) with no momentum of its own
      (``beta1=0``), so an epoch's worth of minibatches speaks, not one. The paper's ``sgd(lr=1e-5)``
      barely moves a ``Trainer``'s step size.
    - ``hyper_learn=None`` resolves to ``"lr"`` and ``hyper_scope=None`` to ``"shared"``: the cheapest
      of the settings that ``python -m benchmarks.benchmark_trainer --sweep`` measured equally robust
      to the initial learning rate (``results/README.md``). ``shared`` learns one scalar and logs one
      key; each extra learned name costs a gradient-sized buffer and a few multi-tensor passes per step.
    - ``lr_scheduler_type=None``: with a tower optimizer and no schedule asked for, the schedule is
      ``constant`` (the tower owns the step size); with ``warmup_steps`` > 0 it is
      ``constant_with_warmup``. A schedule given explicitly *multiplies* the learned step size: the
      weight level uses ``learned_lr * group["lr"] / group["initial_lr"]``. With a standard ``optim``
      ``None`` means ``linear``, the ``Trainer``'s default.

    Raises:
        ValueError: at construction (so at argument parsing, before any model is loaded) for an
            unknown ``optim`` (the message lists every choice), a ``hyper_tower`` that does not parse,
            ``hyper_*`` given with a standard ``optim``, an unknown ``hyper_learn`` or ``hyper_scope``,
            ``optim_args`` the weight level does not take, or DeepSpeed with a tower optimizer.
    """

    optim: str = field(
        default=HyperOptimizerNames.HYPER_ADAMW.value,
        metadata={
            "help": "The optimizer to use: a standard `OptimizerNames` value, or one of "
            f"{', '.join(HYPER_OPTIMIZERS)} for a tower optimizer that learns its own hyperparameters "
            "(weight level = the named algorithm, levels above = --hyper_tower).",
            "choices": list(ALL_OPTIMIZERS),
        },
    )
    lr_scheduler_type: str | None = field(
        default=None,
        metadata={
            "help": "The scheduler type. Default: `constant` (`constant_with_warmup` if --warmup_steps > 0) with a "
            "hyper optimizer, since the tower owns the step size; `linear` otherwise. A schedule given "
            "explicitly multiplies the learned step size.",
            "choices": [s.value for s in SchedulerType],
        },
    )
    hyper_tower: str | None = field(
        default=None,
        metadata={
            "help": "The levels above the weight level, bottom first, separated by '/', e.g. 'sgd(lr=1e-5)' or "
            "'adam(lr=1e-3)/sgd(lr=1e-6)'. Names: sgd, adam, adamw, adagrad, rmsprop; keys lr, momentum, "
            "nesterov, beta1, beta2, eps, weight_decay, alpha, learn=lr+beta1. Default: "
            "hf_hyperopt.DEFAULT_HYPER['default']. Only with a hyper_* --optim.",
        },
    )
    hyper_learn: str | None = field(
        default=None,
        metadata={
            "help": "Which weight-level hyperparameters the tower learns, joined by '+', e.g. 'lr' or 'lr+beta1'. "
            "Allowed: sgd: lr, momentum; adam/adamw: lr, beta1, beta2, eps; adagrad: lr, eps; rmsprop: lr, "
            "alpha, eps (weight_decay is not: the Trainer's no-decay group starts at 0). Default: lr. "
            "Only with a hyper_* --optim.",
        },
    )
    hyper_scope: str | None = field(
        default=None,
        metadata={
            "help": "How many copies of each learned hyperparameter: 'shared' (one for the whole model), 'group' "
            "(one per param group: decay / no decay) or 'tensor' (one per parameter tensor). Default: shared. "
            "Only with a hyper_* --optim.",
            "choices": list(SCOPES),
        },
    )

    def __post_init__(self):
        optim = str(getattr(self.optim, "value", self.optim))
        chosen = self._choose_defaults(optim)
        # TrainingArguments converts optim with OptimizerNames(...), which refuses the hyper names: let
        # it check a standard placeholder, then put the real value back as a HyperOptimizerNames.
        hyper = optim in HYPER_OPTIMIZERS
        if hyper:
            self.optim = OptimizerNames.ADAMW_TORCH.value
        super().__post_init__()
        if chosen is not None:
            self.lr_scheduler_type = chosen  # TrainingArguments made it a SchedulerType, which reads as given
        if hyper:
            self.optim = HyperOptimizerNames(optim)
        self.__dict__["_built"] = True

    def __setattr__(self, name: str, value: object) -> None:
        # ``args.optim = "adamw_torch"`` after construction: what was chosen for the old optimizer (the constant
        # schedule, the tower settings) follows the new one, as with set_optimizer; a refusal changes nothing.
        if name == "optim" and self.__dict__.get("_built"):
            optim = str(getattr(value, "value", value))
            kept = {k: getattr(self, k) for k in (*_HYPER_FIELDS, "lr_scheduler_type")}
            chosen = dict(self.__dict__.get("_chosen", {}))
            try:
                self._choose_defaults(optim)
            except Exception:  # noqa: BLE001 - whatever failed (a bad value's TypeError too), change nothing
                self.__dict__.update(kept)
                self.__dict__["_chosen"] = chosen
                raise
            value = HyperOptimizerNames(optim) if optim in HYPER_OPTIMIZERS else OptimizerNames(optim)
        super().__setattr__(name, value)

    def _given(self, name: str) -> object:
        """Field ``name``'s value, or ``None`` where it is a default chosen for the user: a
        :class:`ChosenDefault` these arguments chose (a copy's came from the arguments it copies). One that
        differs from the choice was set since, keeping the type (``Trainer``'s hyperparameter search sets
        ``type(old)(value)``), and counts as given."""
        value = getattr(self, name)
        chosen = self.__dict__.get("_chosen", {})
        return None if isinstance(value, ChosenDefault) and value == chosen.get(name, value) else value

    def _choose(self, name: str, value: str) -> ChosenDefault:
        """Set field ``name`` to ``value``, chosen for the user."""
        chosen = ChosenDefault(value)
        setattr(self, name, chosen)
        # A new dict, not an update: copy.copy(args) shares the old one, and the copy's choices are its own.
        self.__dict__["_chosen"] = {**self.__dict__.get("_chosen", {}), name: chosen}
        return chosen

    def _choose_defaults(self, optim: str) -> ChosenDefault | None:
        """Check ``optim`` with the ``--hyper_*`` fields and fill in, as :class:`ChosenDefault`, what was not
        given for it: the tower settings and the schedule (returned where chosen). Defaults chosen earlier
        (for another ``optim``, or copied from other arguments) are chosen afresh."""
        if optim not in ALL_OPTIMIZERS:
            raise ValueError(f"--optim {optim!r} is not a known optimizer; choose one of: {', '.join(ALL_OPTIMIZERS)}")
        hyper = optim in HYPER_OPTIMIZERS
        self.hyper_tower, self.hyper_learn, self.hyper_scope = map(self._given, _HYPER_FIELDS)
        given = {k: getattr(self, k) for k in _HYPER_FIELDS if getattr(self, k) is not None}
        if not hyper and given:
            raise ValueError(
                f"{', '.join(f'--{k} {v!r}' for k, v in given.items())} given with --optim {optim!r}, which is not a "
                f"tower optimizer; use one of {', '.join(HYPER_OPTIMIZERS)} or drop the --hyper_* arguments"
            )
        if hyper:
            if self.deepspeed:
                raise ValueError(
                    f"--optim {optim!r} does not support DeepSpeed (deepspeed={self.deepspeed!r}): DeepSpeed replaces "
                    "the optimizer step. Use FSDP (--fsdp) or DDP (torchrun) with a tower optimizer."
                )
            settings = HyperSettings(optim, self.hyper_tower, self.hyper_learn, self.hyper_scope).resolved()
            check_tower_arguments(self, settings)
            for name, value in zip(_HYPER_FIELDS, (settings.tower, settings.learn, settings.scope), strict=True):
                if getattr(self, name) is None:
                    self._choose(name, value)
        if self._given("lr_scheduler_type") is not None:
            return None
        if hyper:
            return self._choose("lr_scheduler_type", "constant_with_warmup" if self.warmup_steps > 0 else "constant")
        return self._choose("lr_scheduler_type", "linear")

    def set_optimizer(
        self,
        name: str | OptimizerNames | HyperOptimizerNames = "adamw_torch",
        learning_rate: float = 5e-5,
        weight_decay: float = 0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
        args: str | None = None,
    ) -> HyperTrainingArguments:
        """``TrainingArguments.set_optimizer``, which also takes the tower optimizers (``name="hyper_adam"``).

        The ``--hyper_*`` settings and the schedule that were chosen for the user follow the new
        optimizer; ones that were given stay (and are refused with a standard optimizer, as at
        construction). Raises as construction does, and then changes nothing.
        """
        kept = {k: getattr(self, k) for k in _SET_OPTIMIZER_FIELDS}
        self.learning_rate, self.weight_decay = learning_rate, weight_decay
        self.adam_beta1, self.adam_beta2, self.adam_epsilon, self.optim_args = beta1, beta2, epsilon, args
        try:
            self.optim = name  # chooses afresh for it (__setattr__), or raises having changed nothing of its own
        except Exception:  # noqa: BLE001 - whatever failed, change nothing
            self.__dict__.update(kept)
            raise
        return self

    # ------------------------------------------------------------------ the tower these arguments describe
    @property
    def lr_scheduler_explicit(self) -> bool:
        """Whether a schedule was chosen: given, or set after construction (``set_lr_scheduler``, or
        ``lr_scheduler_type`` assigned). Only then does it multiply the learned step size; otherwise the
        ``Trainer`` runs a constant one, with warm-up if warm-up steps are set when it starts."""
        return self._given("lr_scheduler_type") is not None

    @property
    def is_hyper(self) -> bool:
        """Whether ``optim`` selects a tower optimizer."""
        return is_hyper_optim(self.optim)

    @property
    def hyper_settings(self) -> HyperSettings:
        """The tower settings these arguments hold (``optim`` must be a hyper one)."""
        if not self.is_hyper:
            raise ValueError(f"--optim {self.optim!r} is not a tower optimizer; it has no tower settings")
        return HyperSettings(str(self.optim), self.hyper_tower, self.hyper_learn, self.hyper_scope).resolved()

    def hyper_weight_values(self) -> dict[str, float]:
        """The weight level's initial values (natural units) from the usual arguments and ``optim_args``.

        ``weight_decay`` is not among them: ``Trainer`` sets it per param group (``weight_decay`` for
        weights, 0 for biases and norms).
        """
        return weight_level_values(self, str(getattr(self.optim, "value", self.optim)))

    def hyper_spec(self) -> str:
        """The full tower spec, weight level first: ``<weight level>/<hyper_tower>``."""
        return self.hyper_settings.spec(self)


@dataclass(frozen=True)
class HyperSettings:
    """What selects and shapes a tower under the ``Trainer``: ``--optim hyper_*`` and the ``--hyper_*`` fields.

    :class:`HyperTrainingArguments` holds these as fields; ``python -m hf_hyperopt.launch`` reads them
    from the command line beside a stock ``TrainingArguments``. The weight level's initial values come
    from the ``TrainingArguments`` (:func:`weight_level_values`).

    Args:
        optim: one of :data:`HYPER_OPTIMIZERS`.
        tower: the levels above the weights (``None``: ``DEFAULT_HYPER["default"]``).
        learn: what the tower learns at the weight level, joined by ``+`` (``None``: ``"lr"``).
        scope: ``shared``, ``group`` or ``tensor`` (``None``: ``"shared"``).
    """

    optim: str
    tower: str | None = None
    learn: str | None = None
    scope: str | None = None

    def resolved(self) -> HyperSettings:
        """These settings with the defaults filled in, checked.

        Raises:
            ValueError: naming the bad value and what is allowed: an ``optim`` that is not a hyper one,
                an unknown ``scope``, a ``learn`` name the weight level does not have (or
                ``weight_decay``), or a ``tower`` that does not parse.
        """
        if self.optim not in HYPER_OPTIMIZERS:
            raise ValueError(
                f"--optim {self.optim!r} is not a tower optimizer; choose one of {', '.join(HYPER_OPTIMIZERS)}"
            )
        scope = "shared" if self.scope is None else self.scope
        if scope not in SCOPES:
            raise ValueError(f"--hyper_scope {scope!r} is not one of {', '.join(SCOPES)}")
        learn = "lr" if self.learn is None else self.learn
        rule = RULES[HyperOptimizerNames(self.optim).rule_name]
        try:
            names = rule.check_learn(rule.split_learn(str(learn)))
        except ValueError as err:
            raise ValueError(f"--hyper_learn {learn!r} with --optim {self.optim}: {err}") from None
        if "weight_decay" in names:
            raise ValueError(
                f"--hyper_learn {learn!r}: weight_decay cannot be learned under the Trainer, whose "
                "no-decay param group (biases, norms) starts at weight_decay=0 and a step size is learned on a "
                "log scale; learn lr, and set --weight_decay"
            )
        tower_spec = default_hyper(None, learn) if self.tower is None else self.tower
        # Parsed under the weight level, so that an error numbers the levels as the tower does.
        parse_spec(f"{rule.name}(learn={learn})/{tower_spec}")
        # Plain strings: a ChosenDefault would reach the optimizer's state dict, which torch.load(weights_only) refuses.
        return HyperSettings(self.optim, str(tower_spec), str(learn), str(scope))

    def spec(self, args: TrainingArguments) -> str:
        """The full tower spec, weight level first, with the weight level's values taken from ``args``."""
        s = self.resolved()
        parts = [
            f"{k}={'true' if v else 'false'}" if k == "nesterov" else f"{k}={float(v)!r}"
            for k, v in weight_level_values(args, s.optim).items()
        ]
        parts.append(f"learn={s.learn}")
        return f"{HyperOptimizerNames(s.optim).rule_name}({','.join(parts)})/{s.tower}"


# The TrainingArguments fields the weight level's values come from (weight_decay: the Trainer's groups).
WEIGHT_LEVEL_FIELDS = ("learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "optim_args")


def check_tower_arguments(args: TrainingArguments, settings: HyperSettings) -> None:
    """Refuse arguments that would not build the tower ``settings`` describe, naming the flag.

    The whole tower is built once on a one-element tensor (microseconds, before any model exists): the
    spec parses and every value is in range and learnable as asked. ``args`` needs only the weight
    level's fields (``learning_rate``, ``adam_*``, ``optim_args``, ``weight_decay``).

    Raises:
        ValueError: naming the argument and what is allowed.
    """
    weight_decay = args.weight_decay
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, (int, float))
        or not 0 <= weight_decay < float("inf")
    ):
        raise ValueError(
            f"--weight_decay {weight_decay!r} is not allowed with --optim {settings.optim}: a tower optimizer "
            "needs a finite weight_decay >= 0"
        )
    try:
        tower([torch.zeros(1)], settings.spec(args), scope=settings.scope)
    except ValueError as err:
        if str(err).startswith("level 0"):
            flags = ", ".join(f"--{f}" for f in WEIGHT_LEVEL_FIELDS)
            raise ValueError(f"{err} (the weight level's values come from {flags})") from None
        raise


def parse_optim_args(optim_args: str | None) -> dict[str, str]:
    """``--optim_args`` as ``transformers`` parses it (``key=value,key=value``, spaces dropped), refusing a
    key given twice (``transformers`` keeps the last silently)."""
    pairs = [item.split("=") for item in optim_args.replace(" ", "").split(",")] if optim_args else []
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"--optim_args {optim_args!r} is not of the form 'key=value,key=value'")
    keys = [key for key, _ in pairs]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise ValueError(f"--optim_args {optim_args!r} gives {', '.join(twice)} more than once")
    return dict(pairs)


def weight_level_values(args: TrainingArguments, optim: str) -> dict[str, float]:
    """The initial values of the weight level of ``optim`` (a hyper one) that ``args`` give.

    ``learning_rate -> lr``; for Adam and AdamW ``adam_beta1/adam_beta2 -> beta1/beta2`` and
    ``adam_epsilon -> eps``; the rest through ``optim_args``, as ``transformers`` does. ``weight_decay``
    is not among them: the ``Trainer`` sets it per param group.

    Raises:
        ValueError: for ``optim_args`` that do not parse or that the weight level does not take.
    """
    name = HyperOptimizerNames(optim).rule_name
    values: dict[str, float] = {"lr": float(args.learning_rate)}
    if name in ("adam", "adamw"):
        values.update(beta1=float(args.adam_beta1), beta2=float(args.adam_beta2), eps=float(args.adam_epsilon))
    optim_args = parse_optim_args(args.optim_args)
    allowed = _OPTIM_ARGS[name]
    fixed = _UNSUPPORTED_OPTIM_ARGS.get(name, {})
    for key, raw in optim_args.items():
        if key in fixed:
            ok = raw.lower() in _FALSE if fixed[key] == "false" else _is_zero(raw)
            if not ok:
                raise ValueError(
                    f"--optim_args {key}={raw} is not supported by --optim hyper_{name}; only {key}={fixed[key]}"
                )
            continue
        if key not in allowed:
            where = "the usual arguments (--adam_beta1, --adam_beta2, --adam_epsilon, --weight_decay)"
            raise ValueError(
                f"--optim_args {key}={raw} is not taken by --optim hyper_{name}; it takes "
                f"{', '.join(allowed) or 'none'} (others come from {where})"
            )
        if key == "nesterov":
            if raw.lower() not in _TRUE + _FALSE:
                raise ValueError(f"--optim_args nesterov={raw} is not a boolean; use true or false")
            values[key] = 1.0 if raw.lower() in _TRUE else 0.0
        else:
            try:
                values[key] = float(raw)
            except ValueError:
                raise ValueError(f"--optim_args {key}={raw} is not a number") from None
    return values


def _is_zero(raw: str) -> bool:
    try:
        return float(raw) == 0.0
    except ValueError:
        return False
