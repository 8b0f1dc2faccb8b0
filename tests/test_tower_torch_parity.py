"""With every hyper step size 0 a tower is its weight-level algorithm: parity with ``torch.optim``.

The tower still runs its forward-mode passes and its upper levels, so this checks that the weight
level states each algorithm exactly as ``torch.optim`` does (weight decay, momentum, Nesterov, bias
corrections, two param groups), and that a zero hyper step leaves every hyperparameter where it began.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hf_hyperopt as hh

STEPS = 50
RTOL = 1e-6

# (tower level 0, torch.optim class, its kwargs); weight decay is filled in by the test.
CASES = {
    "sgd": ("sgd(lr=0.05{wd})", torch.optim.SGD, {"lr": 0.05}),
    "sgd-momentum": ("sgd(lr=0.05,momentum=0.9{wd})", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "sgd-nesterov": (
        "sgd(lr=0.05,momentum=0.9,nesterov=true{wd})",
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "nesterov": True},
    ),
    "adam": ("adam(lr=0.01,beta1=0.8,beta2=0.99{wd})", torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.99)}),
    "adamw": ("adamw(lr=0.01,beta1=0.8,beta2=0.99{wd})", torch.optim.AdamW, {"lr": 0.01, "betas": (0.8, 0.99)}),
    "adagrad": ("adagrad(lr=0.05{wd})", torch.optim.Adagrad, {"lr": 0.05}),
    "rmsprop": ("rmsprop(lr=0.01,alpha=0.9{wd})", torch.optim.RMSprop, {"lr": 0.01, "alpha": 0.9}),
}


def _train(model, opt, data) -> None:
    for x, y in data:
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _hf_groups(model, weight_decay: float) -> list[dict]:
    """The Trainer's split: weight matrices decay, biases do not."""
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@pytest.mark.parametrize(
    "case, weight_decay, upper",
    [(case, wd, "sgd(lr=0)") for case in CASES for wd in (0.0, 0.1)]
    # A zero step of an adaptive upper level must be a no-op too (Adam's update is 0 * m / sqrt(v)).
    + [("adam", 0.0, "adam(lr=0)"), ("rmsprop", 0.1, "adam(lr=0)")],
)
def test_zero_hyper_step_is_torch_optim(case, weight_decay, upper, float64, make_mlp, batches):
    level0, torch_cls, kwargs = CASES[case]
    # AdamW's default weight decay is 1e-2: state it so that 0.0 means none.
    spec = level0.format(wd=f",weight_decay={weight_decay}") + "/" + upper
    data = batches(STEPS)
    ref_model, model = make_mlp(), make_mlp()
    ref = torch_cls(ref_model.parameters(), weight_decay=weight_decay, **kwargs)
    opt = hh.tower(model.parameters(), spec)
    assert opt.height == 1 and opt.learned()[0] == ("lr",)
    _train(ref_model, ref, data)
    _train(model, opt, data)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=1e-10)
    assert opt.hyperparameters()[0]["lr"] == pytest.approx(kwargs["lr"], rel=1e-12)
    # The weights did train, so the agreement is not two untouched models.
    assert not torch.equal(next(model.parameters()), next(make_mlp().parameters()))


@pytest.mark.parametrize("case, scope", [(case, "shared") for case in CASES] + [("adamw", "group")])
def test_zero_hyper_step_two_param_groups(case, scope, float64, make_mlp, batches):
    """The Trainer's two groups (decay / no decay), one learned lr for both (the default) or one each."""
    level0, torch_cls, kwargs = CASES[case]
    data = batches(STEPS)
    ref_model, model = make_mlp(), make_mlp()
    ref = torch_cls(_hf_groups(ref_model, 0.1), **kwargs)
    opt = hh.tower(_hf_groups(model, 0.1), level0.format(wd="") + "/sgd(lr=0)", scope=scope)
    _train(ref_model, ref, data)
    _train(model, opt, data)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=1e-10)
    expected = kwargs["lr"] if scope == "shared" else [kwargs["lr"]] * 2
    assert opt.hyperparameters()[0]["lr"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("hyper", [None, "sgd(lr=0)"])
@pytest.mark.parametrize("momenta", [(0.9, 0.0), (0.0, 0.9)])
def test_sgd_groups_with_and_without_momentum(hyper, momenta, float64, make_mlp, batches):
    """torch.optim.SGD takes a group at momentum 0 beside one with momentum (no momentum for biases, say);
    the tower failed at its first step (KeyError: 'momentum_buffer')."""
    data = batches(STEPS)
    ref_model, model = make_mlp(), make_mlp()

    def groups(m):
        return [{"params": g["params"], "momentum": mu} for g, mu in zip(_hf_groups(m, 0.0), momenta, strict=True)]

    ref = torch.optim.SGD(groups(ref_model), lr=0.05)
    opt = hh.HyperSGD(groups(model), lr=0.05, hyper=hyper)
    _train(ref_model, ref, data)
    _train(model, opt, data)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=1e-10)


def test_plain_algorithm_without_tower(float64, make_mlp, batches):
    """``hyper=None`` is height 0: plain Adam, no tangents kept."""
    data = batches(10)
    ref_model, model = make_mlp(), make_mlp()
    ref = torch.optim.Adam(ref_model.parameters(), lr=0.01)
    opt = hh.HyperAdam(model.parameters(), lr=0.01, hyper=None)
    _train(ref_model, ref, data)
    _train(model, opt, data)
    assert opt.height == 0
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=1e-10)
        assert set(opt.state[p]) == {"exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("case", ["adam", "adamw"])
def test_zero_hyper_step_counts_steps_per_tensor(case, float64, make_mlp, batches):
    """A tensor with a gradient only every third step: its bias corrections count its own steps.

    ``torch.optim`` counts ``state[p]["step"]`` per tensor, and a tensor without a gradient takes no
    step; one count for the whole tower corrected this tensor's moments as if it had stepped every time.
    """
    level0, torch_cls, kwargs = CASES[case]
    data = batches(STEPS)
    models = [make_mlp(), make_mlp()]
    extras = [torch.nn.Parameter(torch.full((3,), 0.1)) for _ in models]
    ref = torch_cls([*models[0].parameters(), extras[0]], **kwargs)
    opt = hh.tower([*models[1].parameters(), extras[1]], level0.format(wd="") + "/sgd(lr=0)")
    for model, extra, o in zip(models, extras, (ref, opt), strict=True):
        for t, (x, y) in enumerate(data):
            out = model(x)
            F.mse_loss(out + extra if t % 3 == 0 else out, y).backward()
            o.step()
            o.zero_grad()  # to None: `extra` has no gradient two steps in three
    for p, q in zip([*models[1].parameters(), extras[1]], [*models[0].parameters(), extras[0]], strict=True):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=1e-10)
    assert not torch.equal(extras[1], torch.full((3,), 0.1))


@pytest.mark.parametrize("case", ["adam", "adamw"])
def test_zero_hyper_step_param_group_added_later(case, float64, make_mlp, batches):
    """A group added after 20 steps starts at step 1, as in ``torch.optim``: its first step is full size."""
    level0, torch_cls, kwargs = CASES[case]
    data = batches(STEPS)
    models = [make_mlp(), make_mlp()]
    ref = torch_cls(models[0][0].parameters(), **kwargs)
    opt = hh.tower(models[1][0].parameters(), level0.format(wd="") + "/sgd(lr=0)")
    for model, o in zip(models, (ref, opt), strict=True):
        for t, (x, y) in enumerate(data):
            if t == 20:
                o.add_param_group({"params": list(model[2].parameters())})
            F.mse_loss(model(x), y).backward()
            o.step()
            model.zero_grad()
    for p, q in zip(models[1].parameters(), models[0].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=1e-10)
    assert not torch.equal(models[1][2].weight, make_mlp()[2].weight)


@pytest.mark.parametrize(
    "ours, theirs, args",
    [
        (hh.HyperSGD, torch.optim.SGD, (0.1, 0.9, 0, 1e-4, True)),  # lr, momentum, dampening, weight_decay, nesterov
        (hh.HyperAdam, torch.optim.Adam, (1e-3, (0.8, 0.99), 1e-7, 1e-3, False)),  # ..., weight_decay, amsgrad
        (hh.HyperAdamW, torch.optim.AdamW, (1e-3, (0.8, 0.99), 1e-7, 1e-3, False)),
        (hh.HyperAdaGrad, torch.optim.Adagrad, (0.01, 0, 1e-4, 0, 1e-9)),  # lr, lr_decay, weight_decay, _, eps
        (hh.HyperRMSProp, torch.optim.RMSprop, (0.01, 0.9, 1e-7, 1e-3, 0, False)),  # ..., momentum, centered
    ],
)
def test_positional_arguments_mean_what_they_mean_to_torch_optim(ours, theirs, args):
    """Code written for the torch.optim class runs unchanged: each positional argument lands where torch
    puts it (HyperSGD(p, 0.1, 0.9, 0, 1e-4) used to read 0 as weight_decay and 1e-4 as nesterov)."""
    p = [torch.nn.Parameter(torch.randn(3))]
    mine, ref = ours(p, *args, hyper=None).param_groups[0], theirs(p, *args).param_groups[0]
    compared = [k for k in ("lr", "momentum", "betas", "eps", "weight_decay", "nesterov", "alpha") if k in mine]
    assert len(compared) >= 3
    for key in compared:
        assert mine[key] == ref[key], key
