"""Towers train: every learned level moves, the loss falls, every scope reports what it learned."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hf_hyperopt as hh


def _train(model, opt, data) -> list[float]:
    losses = []
    for x, y in data:
        loss = F.mse_loss(model(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return losses


def test_height_four_tower_learns_at_every_level(float64, make_mlp, batches):
    # One of each algorithm, so that every rule also runs as an upper level on a vector of raw values.
    spec = "sgd(lr=0.01,momentum=0.5)/rmsprop(lr=0.01)/adam(lr=0.01)/adagrad(lr=0.01)/adam(lr=0.01)"
    model = make_mlp()
    opt = hh.tower(model.parameters(), spec)
    assert opt.height == 4 and opt.learned() == [("lr",)] * 4 + [()]
    start = opt.hyperparameters()
    losses = _train(model, opt, batches(40))
    end = opt.hyperparameters()
    for k in range(4):
        assert math.isfinite(end[k]["lr"]) and end[k]["lr"] > 0
        assert abs(end[k]["lr"] / start[k]["lr"] - 1.0) > 1e-3, f"level {k} did not move: {start[k]} -> {end[k]}"
    assert end[4] == start[4] == {"lr": 0.01}  # the top is fixed
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])


def test_repr_and_spec_round_trip(make_mlp):
    model = make_mlp()
    opt = hh.HyperAdam(model.parameters(), lr=2e-3, learn="lr+beta1", hyper=hh.HyperSGD(lr=1e-5))
    assert opt.spec == "adam(lr=0.002,learn=lr+beta1)/sgd(lr=1e-05)"
    again = hh.tower(model.parameters(), opt.spec)
    assert type(again) is hh.HyperAdam and again.spec == opt.spec and again.learned() == opt.learned()
    default = hh.HyperAdam(model.parameters())
    assert default.height == 1 and default.spec == "adam/" + hh.DEFAULT_HYPER["default"]


def _param_groups(model) -> list[dict]:
    return [
        {"params": [model[0].weight, model[0].bias], "lr": 0.01},
        {"params": [model[2].weight, model[2].bias], "lr": 0.02},
    ]


@pytest.mark.parametrize(
    "scope, expected_len",
    [("shared", None), ("group", 2), ("tensor", 4)],
)
def test_scopes_train_and_report(scope, expected_len, float64, make_mlp, batches):
    model = make_mlp()
    groups = model.parameters() if scope == "shared" else _param_groups(model)
    opt = hh.HyperSGD(groups, lr=0.01, momentum=0.5, learn="lr+momentum", scope=scope, hyper=hh.HyperAdam(lr=0.02))
    losses = _train(model, opt, batches(30))
    level0 = opt.hyperparameters()[0]
    assert set(level0) == {"lr", "momentum"}
    for value in level0.values():
        if expected_len is None:
            assert isinstance(value, float)
            values = [value]
        else:
            assert isinstance(value, list) and len(value) == expected_len and all(isinstance(v, float) for v in value)
            values = value
        assert all(math.isfinite(v) and v > 0 for v in values)
    if scope != "shared":
        # Each unit learns on its own: the two groups (or four tensors) end at different values.
        assert len(set(level0["lr"])) == expected_len
        if scope == "group":
            assert level0["lr"][1] > level0["lr"][0] * 1.2  # started at 0.02 vs 0.01; order kept
    assert sum(losses[-5:]) < sum(losses[:5])


def test_shared_scope_with_different_group_lr_raises(make_mlp):
    with pytest.raises(ValueError, match=r"\[0\.01, 0\.02\].*scope='group'"):
        hh.HyperSGD(_param_groups(make_mlp()), lr=0.01, scope="shared")


def test_scheduler_scales_the_learned_lr(float64, make_mlp, batches):
    """A scheduler that halves group["lr"] halves the step the weights take; the learned value is kept."""
    model = make_mlp()
    opt = hh.HyperSGD(model.parameters(), lr=0.05, hyper=hh.HyperSGD(lr=0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert opt.param_groups[0]["lr"] == 0.025 and opt.param_groups[0]["initial_lr"] == 0.05
    ((x, y),) = batches(1)
    F.mse_loss(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    sched.step()
    for p, b, g in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), b - 0.025 * g)
    assert opt.hyperparameters()[0]["lr"] == pytest.approx(0.05)


def _first_updates(opt_factory, make_scheduler, steps=4):
    """The size of each of the first updates of one weight whose gradient is 1, with the scheduler stepped after each."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = opt_factory([p])
    sched = make_scheduler(opt)
    out = []
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        before = p.item()
        opt.step()
        sched.step()
        out.append(before - p.item())
    return out


def _set_by_hand_then_lambda(opt):
    for g in opt.param_groups:
        g["lr"] = 1e-3
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


@pytest.mark.parametrize(
    "make_scheduler",
    [
        _set_by_hand_then_lambda,
        lambda opt: torch.optim.lr_scheduler.CyclicLR(
            opt, base_lr=1e-3, max_lr=1e-2, step_size_up=3, cycle_momentum=False
        ),
    ],
    ids=["lr set by hand, then LambdaLR", "CyclicLR"],
)
def test_a_scheduler_takes_its_base_as_with_torch_optim(make_scheduler, float64):
    """A torch scheduler takes group["lr"] as it finds it (CyclicLR sets base_lr there first) unless the
    optimizer has written an "initial_lr" of its own: the tower writes none, so it matches torch.optim."""
    expected = _first_updates(lambda ps: torch.optim.SGD(ps, lr=0.1), make_scheduler)
    assert expected[0] == pytest.approx(1e-3)
    got = _first_updates(lambda ps: hh.HyperSGD(ps, lr=0.1, hyper=None), make_scheduler)
    assert got == pytest.approx(expected, rel=1e-12)
    # A tower learns its lr from the scheduler's base: a level above that cannot move keeps torch's steps.
    frozen = _first_updates(lambda ps: hh.HyperSGD(ps, lr=0.1, hyper=hh.HyperSGD(lr=0.0)), make_scheduler)
    assert frozen == pytest.approx(expected, rel=1e-12)


def test_an_lr_set_by_hand_without_a_scheduler_scales_the_learned_lr(float64):
    """With no scheduler, group["lr"] set by hand (as ReduceLROnPlateau does) is a factor on the learned
    step size against the lr the group was built with."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = hh.HyperSGD([p], lr=0.1, hyper=hh.HyperSGD(lr=0.0))
    sizes = []
    for lr in (0.1, 0.05, 0.05):
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.ones_like(p)
        before = p.item()
        opt.step()
        sizes.append(before - p.item())
    assert sizes == pytest.approx([0.1, 0.05, 0.05], rel=1e-12)
    assert opt.hyperparameters()[0]["lr"] == pytest.approx(0.1) and opt.schedule_base(0) == 0.1


def test_the_schedule_base_travels_in_the_state_dict_once_the_tower_has_started(float64):
    """From the first step a group holds its base as initial_lr, so a resumed run scales a hand-set lr
    as the run that never stopped did, whatever lr the new optimizer's group was built with."""

    def build(lr_of_group):
        p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        return p, hh.HyperSGD([{"params": [p], "lr": lr_of_group}], lr=0.1, hyper=hh.HyperSGD(lr=0.0))

    def take_step(p, opt):
        p.grad = torch.ones_like(p)
        before = p.item()
        opt.step()
        return before - p.item()

    p, opt = build(0.1)
    assert "initial_lr" not in opt.param_groups[0]  # a scheduler made now takes group["lr"] as torch's do
    take_step(p, opt)
    assert opt.param_groups[0]["initial_lr"] == 0.1
    opt.param_groups[0]["lr"] = 0.025  # ReduceLROnPlateau
    saved = opt.state_dict()
    q, resumed = build(0.2)
    resumed.load_state_dict(saved)
    assert take_step(q, resumed) == pytest.approx(take_step(p, opt), rel=1e-12) == pytest.approx(0.025)


def test_an_optimizer_pickled_before_the_built_lrs_and_the_horizon_loads_and_steps(float64, make_mlp, batches):
    import pickle

    model = make_mlp()
    opt = hh.HyperAdam(model.parameters(), lr=1e-3)
    opt.param_groups[0]["initial_lr"] = 1e-3  # as the earlier version wrote it at construction
    for name in ("_built_lrs", "_horizon", "_horizon_warned", "_uses_horizon"):
        del opt.__dict__[name]
    model, again = pickle.loads(pickle.dumps((model, opt)))
    assert again.schedule_base(0) == 1e-3 and again.uses_horizon and again.horizon is None
    again.set_horizon(5)
    again.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    assert again.schedule_base(1) == 1e-3
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in batches(2):
        F.mse_loss(model(x), y).backward()
        again.step()
        again.zero_grad()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert again.skipped_hyper_updates() == [0]
