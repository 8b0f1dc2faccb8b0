"""Bad input fails at construction with a ValueError that quotes the value and says what is allowed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import hf_hyperopt as hh


@pytest.fixture
def params():
    return list(nn.Linear(3, 2).parameters())


@pytest.mark.parametrize(
    "spec, quoted, allowed",
    [
        ("adam(lr=1e-3", "'adam(lr=1e-3'", "'('"),
        ("adam lr=1e-3", "'adam lr=1e-3'", "name(key=value, ...)"),
        ("adam(lr=1e-3)//sgd", "empty level 1", "single '/'"),
        ("", "''", "adam(lr=1e-3)/sgd(lr=1e-5)"),
        ("adam(lr=fast)", "lr='fast'", "not a number"),
        ("sgd(nesterov=maybe)", "nesterov='maybe'", "true or false"),
        ("adam/sgd(lr=0.05,nesterov=true)", "level 1 (sgd)", "nesterov=true needs momentum > 0"),
        ("adam(1e-3)", "'1e-3'", "key=value"),
        ("lion(lr=1e-4)/sgd", "'lion'", "sgd, adam, adamw, adagrad, rmsprop"),
        ("adam(momentum=0.9)/sgd", "'momentum'", "lr, beta1, beta2, eps, weight_decay, learn"),
        ("adam(learn=lr+momentum)/sgd", "'momentum'", "lr, beta1, beta2, eps, weight_decay"),
        ("adam(learn=lr+lr)/sgd", "learn=lr+lr", "twice"),
        ("adam(learn=)/sgd", "learn= is empty", "lr, beta1, beta2, eps, weight_decay"),
        ("adam(learn=lr+)/sgd", "adam in tower spec", "learn='lr+' has an empty name"),
        ("adam(learn=lr++beta1)/sgd", "learn='lr++beta1'", "learn=lr+beta1"),
        ("adam(lr=-1e-3)/sgd", "lr=-0.001", ">= 0"),
        ("adam(beta1=1.0)/sgd", "beta1=1.0", "[0, 1)"),
        ("adam(beta2=-0.1)/sgd", "beta2=-0.1", "[0, 1)"),
        ("rmsprop(alpha=1.5)", "alpha=1.5", "[0, 1)"),
        ("adam(lr=nan)", "lr=nan", "not finite"),
        ("adam(lr=1_0)", "lr='1_0'", "not a number"),  # float() reads 10
        ("adam(lr=\uff10.05)", "lr='\uff10.05'", "not a number"),  # a full-width digit: float() reads 0.05
    ],
)
def test_bad_spec(spec, quoted, allowed, params):
    with pytest.raises(ValueError) as err:
        hh.parse_spec(spec)
    assert quoted in str(err.value) and allowed in str(err.value)
    with pytest.raises(ValueError):  # the same refusal when building the optimizer
        hh.tower(params, spec)


@pytest.mark.parametrize(
    "build, quoted, allowed",
    [
        (lambda p: hh.HyperAdam(p, lr=-1.0), "lr=-1.0", ">= 0"),
        (lambda p: hh.HyperAdam(p, betas=(1.0, 0.999)), "beta1=1.0", "[0, 1)"),
        (lambda p: hh.HyperAdam(p, betas=(0.9, 1.2)), "beta2=1.2", "[0, 1)"),
        (lambda p: hh.HyperSGD(p, lr=0.1, momentum=-0.5), "momentum=-0.5", "[0, 1)"),
        (lambda p: hh.HyperAdam(p, learn="lr+gamma"), "'gamma'", "lr, beta1, beta2, eps, weight_decay"),
        (lambda p: hh.HyperAdam(p, learn="lr+nesterov"), "'nesterov'", "lr, beta1"),
        (lambda p: hh.HyperSGD(p, lr=0.1, learn="momentum"), "momentum=0.0", "kept in [3.059"),
        (lambda p: hh.HyperAdam(p, hyper=hh.HyperSGD(lr=1e-5, learn="lr")), "learn=lr", "add a level above"),
        (lambda p: hh.tower(p, "adam/sgd(learn=lr)"), "learn=lr", "add a level above"),
        (lambda p: hh.tower(p, "adam/sgd(lr=0)/sgd(lr=1e-3)"), "lr=0.0", "kept in [1e-30, 1000000]"),
        # outside the learned coordinate's bounds: it would be moved to the nearest one at the first step
        (lambda p: hh.HyperAdam(p, lr=1e10), "lr=10000000000.0", "kept in [1e-30, 1000000]"),
        (lambda p: hh.HyperAdam(p, lr=1e-40), "lr=1e-40", "kept in [1e-30, 1000000]"),
        (lambda p: hh.HyperAdam(p, betas=(0.9, 0.9999999), learn="lr+beta2"), "beta2=0.9999999", "0.999999694"),
        # not numbers, or not a pair: named, not a bare TypeError / IndexError from float() or indexing
        (lambda p: hh.HyperAdam(p, lr="abc"), "lr='abc'", "not a number"),
        (lambda p: hh.HyperAdam(p, lr=None), "lr=None", "not a number"),
        (lambda p: hh.HyperAdam(p, betas=(0.9,)), "betas=(0.9,)", "a pair (beta1, beta2)"),
        (lambda p: hh.HyperAdam(p, betas=(0.9, 0.99, 0.5)), "betas=(0.9, 0.99, 0.5)", "a pair"),
        (lambda p: hh.HyperAdam(p, learn=5), "learn=5", "hyperparameter names"),
        (lambda p: hh.HyperAdam([{"params": p, "lr": "x"}]), "lr='x'", "not a number"),
        (lambda p: hh.HyperAdam([{"params": p, "betas": (0.9,)}]), "betas=(0.9,)", "a pair"),
        (lambda p: hh.HyperSGD(p, lr=0.1, momentum=0.9, nesterov="false"), "nesterov='false'", "not a number"),
        # torch.optim's arguments that a tower does not implement: taken at their defaults, refused otherwise
        (lambda p: hh.HyperAdam(p, amsgrad=True), "amsgrad=True is not supported", "amsgrad=False"),
        (lambda p: hh.HyperAdamW(p, maximize=True), "maximize=True is not supported", "maximize=False"),
        (lambda p: hh.HyperSGD(p, 0.1, 0.9, 0.5), "dampening=0.5 is not supported", "dampening=0.0"),
        (lambda p: hh.HyperAdaGrad(p, lr_decay=0.1), "lr_decay=0.1 is not supported", "lr_decay=0.0"),
        (lambda p: hh.HyperRMSProp(p, centered=True), "centered=True is not supported", "centered=False"),
        (lambda p: hh.HyperAdam(fused=True), "fused=True is not supported", "fused=None"),
        # ... and in a param group, where they were dropped: maximize=True descended
        (lambda p: hh.HyperAdam([{"params": p, "maximize": True}]), "group 0: maximize=True", "maximize=False"),
        (lambda p: hh.HyperAdam([{"params": p, "amsgrad": True}]), "group 0: amsgrad=True", "amsgrad=False"),
        (
            lambda p: hh.HyperAdam([{"params": p[:1]}, {"params": p[1:], "decoupled_weight_decay": True}]),
            "group 1: decoupled_weight_decay=True",
            "decoupled_weight_decay=False",
        ),
        (lambda p: hh.HyperRMSProp([{"params": p, "centered": True}]), "group 0: centered=True", "centered=False"),
        (  # torch.optim.Adam's groups: coupled decay, which AdamW does not run
            lambda p: hh.HyperAdamW(torch.optim.Adam(p).param_groups),
            "group 0: decoupled_weight_decay=False",
            "decoupled_weight_decay=True",
        ),
        (
            lambda p: hh.HyperSGD([{"params": p, "nesterov": True}], lr=0.1, momentum=0.9),
            "group 0: nesterov=True",
            "nesterov=False for every group; give nesterov to the optimizer",
        ),
        # a bool where a number belongs: HyperSGD(p, lr, momentum, weight_decay, nesterov) in the order before
        # torch.optim's (dampening comes fourth) would read True as a weight decay of 1.0
        (lambda p: hh.HyperSGD(p, 0.1, 0.9, 0, True), "weight_decay=True", "is a bool, not a number"),
        (lambda p: hh.HyperAdam([{"params": p, "lr": True}]), "lr=True", "is a bool, not a number"),
        (lambda p: hh.HyperAdam(p, scope="layer"), "'layer'", "shared, group, tensor"),
        (lambda p: hh.HyperAdam(p, compat="paper"), "'paper'", "'gdtuo'"),
        (lambda p: hh.HyperAdam(p, hyper="sgd(lr=1e-5"), "'sgd(lr=1e-5'", "'('"),
        (lambda p: hh.HyperAdam(p, hyper=hh.HyperSGD(p)), "HyperSGD", "upper levels take none"),
        (lambda p: hh.HyperAdam(p, hyper=0.01), "0.01", "spec string or None"),
        (lambda p: hh.HyperSGD(p, lr=0.1, nesterov=True, hyper=None), "nesterov=true", "momentum > 0"),
        (
            lambda p: hh.HyperAdam([{"params": p[:1], "lr": 1e-3}, {"params": p[1:], "lr": 1e-4}]),
            "[0.001, 0.0001]",
            "scope='group'",
        ),
        (lambda p: hh.HyperAdam([{"params": p, "lr": -0.1}]), "lr=-0.1", ">= 0"),
    ],
)
def test_bad_arguments(build, quoted, allowed, params):
    with pytest.raises(ValueError) as err:
        build(params)
    assert quoted in str(err.value) and allowed in str(err.value), str(err.value)


def test_param_groups_may_repeat_what_the_tower_runs_as(params):
    """Options at the values the tower runs as (torch.optim's defaults, or the optimizer's own) are taken."""
    hh.HyperAdamW([{"params": params, "decoupled_weight_decay": True, "foreach": True, "maximize": False}])
    hh.HyperSGD([{"params": params, "nesterov": True}], lr=0.1, momentum=0.9, nesterov=True)
    opt = hh.HyperAdam(params[:1])
    with pytest.raises(ValueError, match="param group 1: maximize=True"):
        opt.add_param_group({"params": params[1:], "maximize": True})
    assert len(opt.param_groups) == 1


def test_errors_come_before_any_step(params):
    """A refused optimizer leaves the parameters untouched: nothing ran."""
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError):
        hh.tower(params, "adam(lr=1e-3)/sgd(lr=1e-5,learn=lr)")
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def _trained(spec: str, params, **kw):
    opt = hh.tower(params, spec, **kw)
    sum(p.sum() for p in params).backward()
    opt.step()
    return opt


@pytest.mark.parametrize(
    "saved, loader, quoted",
    [
        ("adam(lr=0.01)/sgd(lr=1e-5)", "adam(lr=0.01)/adam(lr=0.01)", "'adam(lr=0.01)/sgd(lr=1e-05)'"),
        ("adam(lr=0.01)/sgd(lr=1e-5)", "sgd(lr=0.01)/sgd(lr=1e-5)", "'adam(lr=0.01)/sgd(lr=1e-05)'"),
        ("adam(lr=0.01,learn=lr+beta1)/sgd(lr=1e-5)", "adam(lr=0.01)/sgd(lr=1e-5)", "learn=lr+beta1"),
    ],
)
def test_load_state_dict_from_a_different_tower(saved, loader, quoted, params):
    sd = _trained(saved, params).state_dict()
    other = hh.tower(params, loader)
    with pytest.raises(ValueError) as err:
        other.load_state_dict(sd)
    assert "different tower" in str(err.value) and quoted in str(err.value) and repr(other.spec) in str(err.value)
    assert "to load it, build this optimizer with that spec" in str(err.value)


@pytest.mark.parametrize(
    "saved, loader, differs",
    [
        ("adam/sgd(lr=1e-5)", "adam(lr=5e-4)/sgd(lr=1e-5)", "(level 0 (adam): lr=0.001 saved, 0.0005 here)"),
        (
            "adam/adam(lr=0.05)",
            "adam/adam(lr=0.02,trace=0.9)",
            "(level 1 (adam): lr=0.05 saved, 0.02 here, trace=0.0 saved, 0.9 here)",
        ),
        ("adam/adam(lr=0.05)", "adamw/sgd", "(level 0: adam saved, adamw here; level 1: adam saved, sgd here)"),
        ("adam/adam(lr=0.05)", "adam/adam/sgd", "(2 levels saved, 3 here)"),
    ],
)
def test_a_different_tower_is_named_by_what_differs(saved, loader, differs, params):
    """The error says first what differs, value by value: a spec leaves its defaults out (a saved
    'adam/...' started at lr=0.001), and a Trainer's resume quotes only the message's beginning."""
    sd = _trained(saved, params).state_dict()
    with pytest.raises(ValueError) as err:
        hh.tower(params, loader).load_state_dict(sd)
    assert str(err.value).startswith("state_dict is from a different tower " + differs + ": its spec is")


@pytest.mark.parametrize(
    "build",
    [
        lambda p: hh.HyperAdam(p, lr=1e-3, hyper=hh.HyperSGD(lr=1e-5)),  # spec 'adam/sgd(lr=1e-05)'
        lambda p: hh.tower(p, "adam(lr=1e-3)/sgd(lr=1e-5)"),  # the default lr written out
        lambda p: hh.tower(p, "adam(lr=0.001,beta1=0.9,learn=lr)/sgd(lr=1e-05)"),  # as a model card writes it
    ],
)
def test_one_tower_written_in_other_words_loads_the_state_dict(build, params):
    """The spec is compared as the levels it describes, not as text: defaults written out or left out
    and ``learn=`` given as its default are the same tower (each refused the others' checkpoints)."""
    sd = _trained("adam/sgd(lr=1e-5)", params).state_dict()
    opt = build(params)
    opt.load_state_dict(sd)
    same = hh.tower(params, "adam/sgd(lr=1e-5)")
    same.load_state_dict(sd)
    assert opt.hyperparameters() == same.hyperparameters()


@pytest.mark.parametrize("kw, quoted", [({"scope": "group"}, "'group'"), ({"compat": "gdtuo"}, "'gdtuo'")])
def test_load_state_dict_from_another_scope_or_mode(kw, quoted, params):
    sd = _trained("adam(lr=0.01)/sgd(lr=1e-5)", params, **kw).state_dict()
    with pytest.raises(ValueError, match="different tower") as err:
        hh.tower(params, "adam(lr=0.01)/sgd(lr=1e-5)").load_state_dict(sd)
    assert quoted in str(err.value)
    advice = {"'group'": "build this optimizer with that scope", "'gdtuo'": "with compat='gdtuo'"}[quoted]
    assert advice in str(err.value)
    if quoted == "'gdtuo'":  # the other way round: a default-mode state dict into a gdtuo tower
        sd = _trained("adam(lr=0.01)/sgd(lr=1e-5)", params).state_dict()
        with pytest.raises(ValueError, match="build this optimizer without compat"):
            hh.tower(params, "adam(lr=0.01)/sgd(lr=1e-5)", compat="gdtuo").load_state_dict(sd)


def test_load_state_dict_from_plain_torch_optim(params):
    plain = torch.optim.Adam(params, lr=0.01)
    sum(p.sum() for p in params).backward()
    plain.step()
    opt = hh.HyperAdam(params, lr=0.01)
    before = opt.state_dict()
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(plain.state_dict())
    assert "no 'tower' entry" in str(err.value) and repr(opt.spec) in str(err.value)
    assert opt.state_dict()["param_groups"] == before["param_groups"]  # refused before changing anything


def test_upper_level_cannot_step(params):
    upper = hh.HyperSGD(lr=1e-5)
    with pytest.raises(RuntimeError, match="no parameters"):
        upper.step()


def test_a_subclass_is_an_upper_level_written_with_its_builtin_class_arguments(params):
    class WarmAdam(hh.HyperAdam):
        def __init__(self, params=None, lr=1e-3, warmup=10, **kwargs):
            super().__init__(params, lr=lr, **kwargs)

    opt = hh.HyperAdam(params, hyper=WarmAdam(lr=0.01, betas=(0.8, 0.99)))
    assert opt.spec == "adam/adam(lr=0.01,beta1=0.8,beta2=0.99)"
    with pytest.raises(TypeError, match=r"WarmAdam\(\.\.\.\) without params .* arguments of HyperAdam: .*'warmup'"):
        WarmAdam(warmup=3)
    with pytest.raises(TypeError, match=r"HyperSGD\(\.\.\.\) without params .*'foo'"):
        hh.HyperSGD(foo=1)


def test_an_upper_level_is_a_plain_description_checked_when_written():
    """Without parameters a Hyper* class gives level configs, not an optimizer that owns nothing."""
    upper = hh.HyperAdam(lr=0.01, learn="lr+beta1", hyper=hh.HyperSGD(lr=1e-4))
    assert not isinstance(upper, torch.optim.Optimizer)
    assert [c.to_spec() for c in upper.levels] == ["adam(lr=0.01,learn=lr+beta1)", "sgd(lr=0.0001)"]
    assert repr(upper) == "HyperAdam(adam(lr=0.01,learn=lr+beta1)/sgd(lr=0.0001))"
    with pytest.raises(dataclasses.FrozenInstanceError):
        upper.levels[0].learn = ("lr",)
    for build, message in [
        (lambda: hh.HyperSGD(lr=-1.0), "sgd: lr=-1.0 is negative"),
        (lambda: hh.HyperAdam(betas=(0.9, 1.5)), "adam: beta2=1.5 is outside [0, 1)"),
        (lambda: hh.HyperAdam(learn="lr+gamma"), "adam: learn=lr+gamma: 'gamma' is not a hyperparameter"),
        # The tower's own arguments would be dropped: they are refused, naming where they go.
        (lambda: hh.HyperSGD(lr=1e-5, scope="tensor"), "scope='tensor' is the whole tower's: give it to the optimizer"),
        (
            lambda: hh.HyperSGD(lr=1e-5, compat="gdtuo", scope="group"),
            "HyperAdam(params, scope='group', compat='gdtuo'",
        ),
        (lambda: hh.tower([torch.zeros(1)], hh.HyperSGD(lr=1e-5)), "a tower spec is a string"),
    ]:
        with pytest.raises(ValueError) as err:
            build()
        assert message in str(err.value)


def test_learn_names_get_one_check_from_every_entry_point(params):
    """A spec string, an optimizer's ``learn=`` and ``--hyper_learn`` refuse a bad name with the same words."""
    from hf_hyperopt.trainer import HyperTrainingArguments

    expected = "learn=lr+gamma: 'gamma' is not a hyperparameter of adam that can be learned; allowed: lr, beta1"
    entry_points = [
        lambda learn: hh.parse_spec(f"adam(learn={learn})/sgd"),
        lambda learn: hh.HyperAdam(params, learn=learn),
        lambda learn: HyperTrainingArguments(output_dir="unused", optim="hyper_adam", hyper_learn=learn),
        lambda learn: hh.HyperAdam(learn=learn),  # an upper level
    ]
    for build in entry_points:
        with pytest.raises(ValueError) as err:
            build("lr+gamma")
        assert expected in str(err.value)
        with pytest.raises(ValueError) as err:  # and a name left empty between the '+' signs
            build("lr+")
        assert "learn='lr+' has an empty name" in str(err.value)


def test_flags_take_numpy_bools_and_adamw_takes_decoupled_weight_decay(params):
    import numpy as np

    assert hh.HyperSGD(params, 0.1, momentum=0.9, nesterov=np.True_).param_groups[0]["nesterov"] is True
    hh.HyperAdamW(params, decoupled_weight_decay=True)  # torch.optim.AdamW is decoupled whatever it is told
