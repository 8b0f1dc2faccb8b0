"""HyperTrainingArguments and HyperTrainer construction: parsing, defaults, the weight level, bad input.

Everything here runs before any training step; the bad inputs must raise at parse or build time.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from tiny_models import tiny_bert
from transformers import HfArgumentParser, TrainingArguments
from transformers.training_args import OptimizerNames

import hf_hyperopt as hh
from hf_hyperopt.trainer import ALL_OPTIMIZERS, HYPER_OPTIMIZERS, HyperTrainer, HyperTrainingArguments


def parse(*argv: str, tmp_path) -> HyperTrainingArguments:
    (args,) = HfArgumentParser(HyperTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--report_to", "none", *argv]
    )
    return args


@pytest.mark.parametrize("optim", HYPER_OPTIMIZERS)
def test_hyper_optim_parses_with_documented_defaults(optim, tmp_path):
    args = parse("--optim", optim, tmp_path=tmp_path)
    assert str(args.optim) == optim and args.is_hyper
    assert args.hyper_tower == hh.DEFAULT_HYPER["default"]
    assert (args.hyper_learn, args.hyper_scope) == ("lr", "shared")
    assert args.lr_scheduler_type == "constant"
    assert args.to_dict()["optim"] == optim


def test_schedule_defaults_constant_with_warmup_and_explicit_is_kept(tmp_path):
    assert parse("--optim", "hyper_adam", "--warmup_steps", "3", tmp_path=tmp_path).lr_scheduler_type == (
        "constant_with_warmup"
    )
    explicit = parse("--optim", "hyper_adam", "--lr_scheduler_type", "cosine", tmp_path=tmp_path)
    assert explicit.lr_scheduler_type == "cosine" and explicit.lr_scheduler_explicit
    standard = parse("--optim", "adamw_torch", tmp_path=tmp_path)
    assert standard.lr_scheduler_type == "linear" and standard.optim == OptimizerNames.ADAMW_TORCH
    assert not standard.is_hyper


@pytest.mark.parametrize("how", ["set_lr_scheduler", "assigned"])
def test_a_schedule_set_after_construction_is_the_one_that_runs(how, tmp_path):
    """The constant schedule chosen for the user gave way only to one given at construction: a schedule
    set later (TrainingArguments.set_lr_scheduler, or the field assigned) was replaced without a word."""
    args = parse("--optim", "hyper_adam", "--max_steps", "8", tmp_path=tmp_path)
    assert not args.lr_scheduler_explicit
    if how == "set_lr_scheduler":
        args = args.set_lr_scheduler(name="cosine", num_epochs=1, warmup_steps=2)
    else:
        args.lr_scheduler_type = "cosine"
    assert args.lr_scheduler_explicit
    trainer = HyperTrainer(model=tiny_bert(), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=8)
    assert type(trainer.lr_scheduler).__name__ == "LambdaLR"
    factors = []
    for _ in range(8):
        factors.append(trainer.lr_scheduler.get_last_lr()[0] / trainer.optimizer.param_groups[0]["initial_lr"])
        trainer.lr_scheduler.step()
    assert factors[-1] < 0.2  # cosine decays to 0; the constant schedule would hold 1
    # Warm-up set later still goes with the schedule chosen for the user.
    late = parse("--optim", "hyper_adam", tmp_path=tmp_path)
    late.warmup_steps = 3
    assert not late.lr_scheduler_explicit


@pytest.mark.parametrize("copy", ["replace", "to_dict"])
def test_copies_choose_their_defaults_afresh(copy, tmp_path):
    """dataclasses.replace (and HyperTrainingArguments(**args.to_dict())) hand every field to the new
    arguments, including what __post_init__ chose for the user: the constant schedule then read as given
    and dropped the copy's warm-up, and the resolved --hyper_* defaults refused a standard --optim."""

    def copied(args, **changes):
        if copy == "replace":
            return dataclasses.replace(args, **changes)
        init = {f.name for f in dataclasses.fields(args) if f.init}
        return HyperTrainingArguments(**{k: v for k, v in {**args.to_dict(), **changes}.items() if k in init})

    hyper = parse("--optim", "hyper_adam", "--max_steps", "8", tmp_path=tmp_path)
    warm = copied(hyper, warmup_steps=3)
    assert warm.lr_scheduler_type == "constant_with_warmup" and not warm.lr_scheduler_explicit
    assert warm.hyper_tower == hh.DEFAULT_HYPER["default"]
    trainer = HyperTrainer(model=tiny_bert(), args=warm)
    trainer.create_optimizer_and_scheduler(num_training_steps=8)
    assert trainer.lr_scheduler.get_last_lr()[0] == 0.0  # warm-up from 0, as a schedule given with it does
    standard = copied(hyper, optim="adamw_torch")
    assert standard.lr_scheduler_type == "linear" and not standard.is_hyper
    assert (standard.hyper_tower, standard.hyper_learn, standard.hyper_scope) == (None, None, None)
    back = copied(standard, optim="hyper_adam")
    assert back.lr_scheduler_type == "constant" and not back.lr_scheduler_explicit
    # What the user gave stays given.
    given = parse("--optim", "hyper_adam", "--lr_scheduler_type", "cosine", "--hyper_scope", "group", tmp_path=tmp_path)
    kept = copied(given, warmup_steps=3)
    assert kept.lr_scheduler_type == "cosine" and kept.lr_scheduler_explicit and kept.hyper_scope == "group"
    with pytest.raises(ValueError, match="hyper_scope 'group'"):
        copied(given, optim="adamw_torch")


def test_set_optimizer_takes_the_tower_optimizers(tmp_path):
    """TrainingArguments.set_optimizer refused the hyper names (OptimizerNames(name)); switching kept the
    schedule and tower settings chosen for the previous optimizer."""
    args = parse("--optim", "adamw_torch", tmp_path=tmp_path)
    assert args.set_optimizer(name="hyper_adam", learning_rate=3e-4, beta1=0.8) is args
    assert args.is_hyper and args.hyper_tower == hh.DEFAULT_HYPER["default"]
    assert args.lr_scheduler_type == "constant" and not args.lr_scheduler_explicit
    assert args.hyper_spec().startswith("adam(lr=0.0003,beta1=0.8,")
    args.set_optimizer(name="adamw_torch")
    assert args.optim == OptimizerNames.ADAMW_TORCH and args.lr_scheduler_type == "linear"
    assert (args.hyper_tower, args.hyper_learn, args.hyper_scope) == (None, None, None)
    # A refused change leaves the arguments as they were.
    given = parse("--optim", "hyper_sgd", "--hyper_tower", "sgd(lr=1e-5)", tmp_path=tmp_path)
    with pytest.raises(ValueError, match="hyper_tower 'sgd"):
        given.set_optimizer(name="adamw_torch", learning_rate=1.0)
    with pytest.raises(ValueError, match="not a known optimizer"):
        given.set_optimizer(name="hyper_lion")
    assert str(given.optim) == "hyper_sgd" and given.learning_rate == 5e-5 and given.hyper_tower == "sgd(lr=1e-5)"
    with pytest.raises(TypeError):  # a value that is not a number fails in float(): nothing changes either
        given.set_optimizer(name="hyper_adam", learning_rate=None)
    assert str(given.optim) == "hyper_sgd" and given.learning_rate == 5e-5 and not given.lr_scheduler_explicit


def test_assigning_optim_chooses_for_the_new_optimizer(tmp_path):
    """``args.optim = "adamw_torch"`` on the default arguments (a baseline run) kept the constant schedule
    chosen for the tower: AdamW ran without the linear decay TrainingArguments gives it."""
    args = HyperTrainingArguments(output_dir=str(tmp_path), report_to="none")
    assert args.lr_scheduler_type == "constant"
    args.optim = "adamw_torch"
    assert args.optim == OptimizerNames.ADAMW_TORCH and args.lr_scheduler_type == "linear"
    assert (args.hyper_tower, args.hyper_learn, args.hyper_scope) == (None, None, None)
    args.optim = "hyper_adam"
    assert str(args.optim) == "hyper_adam" and args.lr_scheduler_type == "constant" and args.hyper_scope == "shared"
    given = parse("--optim", "hyper_sgd", "--hyper_tower", "sgd(lr=1e-5)", "--lr_scheduler_type", "cosine",
                  tmp_path=tmp_path)  # fmt: skip
    for bad, match in (("adamw_torch", "hyper_tower 'sgd"), ("hyper_lion", "not a known optimizer")):
        with pytest.raises(ValueError, match=match):
            given.optim = bad
        assert str(given.optim) == "hyper_sgd" and given.hyper_tower == "sgd(lr=1e-5)" and given.hyper_learn == "lr"
    given.hyper_tower = None
    given.optim = "adamw_torch"
    assert given.lr_scheduler_type == "cosine" and given.lr_scheduler_explicit  # given: kept
    # A shallow copy's choices are its own: the original's schedule stays chosen, not given.
    args = HyperTrainingArguments(output_dir=str(tmp_path), report_to="none")
    other = copy.copy(args)
    other.optim = "adamw_torch"
    assert other.lr_scheduler_type == "linear" and args.lr_scheduler_type == "constant"
    assert not args.lr_scheduler_explicit


def test_a_schedule_set_by_a_hyperparameter_search_runs(tmp_path):
    """Trainer's hyperparameter search sets type(old)(value): a searched "cosine" became a ChosenDefault and
    was replaced by the constant schedule chosen for the user."""
    from transformers.trainer_utils import HPSearchBackend

    args = parse("--optim", "hyper_adam", "--max_steps", "10", tmp_path=tmp_path)
    trainer = HyperTrainer(model=tiny_bert(), args=args)
    trainer.hp_search_backend = HPSearchBackend.RAY  # the trial is a plain dict of values
    trainer._hp_search_setup({"lr_scheduler_type": "cosine"})
    assert trainer.args.lr_scheduler_type == "cosine" and trainer.args.lr_scheduler_explicit
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert trainer.lr_scheduler.lr_lambdas[0](5) == pytest.approx(0.5)


def test_weight_level_takes_the_usual_arguments(tmp_path):
    args = parse(
        "--optim",
        "hyper_adam",
        "--learning_rate",
        "3e-4",
        "--adam_beta1",
        "0.8",
        "--adam_beta2",
        "0.95",
        "--adam_epsilon",
        "1e-6",
        "--hyper_tower",
        "sgd(lr=1e-5)",
        "--hyper_learn",
        "lr+beta1",
        tmp_path=tmp_path,
    )
    assert args.hyper_spec() == "adam(lr=0.0003,beta1=0.8,beta2=0.95,eps=1e-06,learn=lr+beta1)/sgd(lr=1e-5)"
    sgd = parse("--optim", "hyper_sgd", "--optim_args", "momentum=0.9,nesterov=true", tmp_path=tmp_path)
    assert sgd.hyper_weight_values() == {"lr": 5e-5, "momentum": 0.9, "nesterov": 1.0}
    rms = parse("--optim", "hyper_rmsprop", "--optim_args", "alpha=0.9,eps=1e-7", tmp_path=tmp_path)
    assert rms.hyper_weight_values() == {"lr": 5e-5, "alpha": 0.9, "eps": 1e-7}


def test_tower_respects_decay_groups_and_initial_values(tmp_path):
    args = HyperTrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        optim="hyper_sgd",
        optim_args="momentum=0.5",
        learning_rate=0.02,
        weight_decay=0.1,
        hyper_tower="sgd(lr=1e-4)",
    )
    trainer = HyperTrainer(model=tiny_bert(hidden_size=8, intermediate_size=16), args=args)
    opt = trainer.create_optimizer()
    assert isinstance(opt, hh.HyperSGD) and trainer.tower is opt
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(g["momentum"] == 0.5 and g["lr"] == 0.02 for g in opt.param_groups)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert all("bias" in names[id(p)] or "LayerNorm" in names[id(p)] for p in opt.param_groups[1]["params"])
    assert opt.spec == "sgd(lr=0.02,momentum=0.5,weight_decay=0.1,learn=lr)/sgd(lr=0.0001)"
    assert opt.hyperparameters() == [{"lr": pytest.approx(0.02)}, {"lr": 1e-4}]


def test_unknown_optim_lists_every_choice(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse("--optim", "hyper_lion", tmp_path=tmp_path)
    err = capsys.readouterr().err
    assert "hyper_lion" in err and "hyper_adam" in err and "adamw_torch" in err and "sgd" in err
    with pytest.raises(ValueError, match="hyper_lion") as info:
        HyperTrainingArguments(output_dir=str(tmp_path), optim="hyper_lion")
    assert all(name in str(info.value) for name in ALL_OPTIMIZERS)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optim": "hyper_adam", "hyper_tower": "adam(lr=1e-3"}, "unbalanced"),
        ({"optim": "hyper_adam", "hyper_tower": "lion(lr=1e-3)"}, "unknown optimizer 'lion'"),
        ({"optim": "hyper_adam", "hyper_tower": "sgd(lr=-1)"}, "negative"),
        ({"optim": "adamw_torch", "hyper_tower": "sgd(lr=1e-5)"}, "not a tower optimizer"),
        ({"optim": "adamw_torch", "hyper_scope": "group"}, "--hyper_scope"),
        ({"optim": "hyper_adam", "hyper_learn": "momentum"}, "allowed: lr, beta1, beta2, eps"),
        ({"optim": "hyper_adam", "hyper_learn": "weight_decay"}, "no-decay param group"),
        ({"optim": "hyper_adam", "hyper_scope": "layer"}, "shared, group, tensor"),
        ({"optim": "hyper_adam", "optim_args": "momentum=0.9"}, "not taken by --optim hyper_adam"),
        ({"optim": "hyper_sgd", "optim_args": "dampening=0.1"}, "only dampening=0"),
        ({"optim": "hyper_adam", "learning_rate": 0.0}, "cannot learn lr=0.0.*come from --learning_rate"),
        ({"optim": "hyper_sgd", "optim_args": "momentum=0.9,momentum=0"}, "gives momentum more than once"),
        ({"optim": "hyper_sgd", "optim_args": "momentum"}, "not of the form 'key=value,key=value'"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        HyperTrainingArguments(output_dir=str(tmp_path), report_to="none", **kwargs)


def test_bad_hyper_tower_raises_in_the_parser(tmp_path):
    with pytest.raises(ValueError, match="cannot parse level 1"):
        parse("--optim", "hyper_adam", "--hyper_tower", "sgd(lr=1e-5)x", tmp_path=tmp_path)


def test_deepspeed_with_a_tower_is_refused(tmp_path):
    with pytest.raises(ValueError, match="DeepSpeed.*FSDP"):
        HyperTrainingArguments(output_dir=str(tmp_path), optim="hyper_adam", deepspeed="ds_config.json")


def test_optimizers_with_hyper_optim_raise_before_training(tmp_path):
    model = tiny_bert(hidden_size=8, intermediate_size=16)
    before = [p.detach().clone() for p in model.parameters()]
    args = HyperTrainingArguments(output_dir=str(tmp_path), report_to="none", optim="hyper_adam")
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="optimizers= was given together with optim='hyper_adam'"):
        HyperTrainer(model=model, args=args, optimizers=(opt, None))
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs= was given together"):
        HyperTrainer(model=model, args=args, optimizer_cls_and_kwargs=(hh.HyperAdam, {"lr": 1e-3}))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_ready_tower_through_optimizer_cls_and_kwargs(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", optim="adamw_torch")
    trainer = HyperTrainer(
        model=tiny_bert(hidden_size=8, intermediate_size=16),
        args=args,
        optimizer_cls_and_kwargs=(hh.HyperAdam, {"lr": 1e-3, "hyper": "sgd(lr=1e-5)"}),
    )
    opt = trainer.create_optimizer()
    assert opt.spec == "adam/sgd(lr=1e-05)" and len(opt.param_groups) == 2
