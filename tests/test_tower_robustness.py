"""What real training throws at a tower: non-finite hypergradients, all-zero gradient rows, closures,
parameters without gradients, absurd hyper step sizes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hf_hyperopt as hh


def _step(model, opt, batch) -> float:
    x, y = batch
    loss = F.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    "upper",
    [
        "sgd(lr=0.01)",
        "adam(lr=0.01)",
        "adam(lr=0.01)/adam(lr=0.01)",
        # normalized: a non-finite tangent has a non-finite norm, which must not turn h into a finite 0
        "adam(lr=0.01,normalize=true)",
        "adam(lr=0.01,normalize=true)/adam(lr=0.01,normalize=true)",
        "adam(lr=0.01,normalize=true,timescale=2)/adam(lr=0.01,timescale=3)",
    ],
)
def test_nonfinite_hypergradient_is_skipped_and_counted(bad, upper, float64, make_mlp, batches):
    model = make_mlp()
    opt = hh.tower(model.parameters(), "adam(lr=0.01)/" + upper)
    data = batches(8)
    for batch in data[:3]:
        _step(model, opt, batch)
    # A non-finite tangent entry stands in for any overflow: it makes <g, tangent> non-finite.
    first = next(model.parameters())
    opt.state[first]["hypertangent_lr"].view(-1)[0] = bad
    before_h = opt.hyperparameters()
    before_w = [p.detach().clone() for p in model.parameters()]
    _step(model, opt, data[3])
    # Counted once per level: a hypergradient built on a non-finite one is skipped as well.
    assert opt.skipped_hyper_updates() == [1] * opt.height
    assert opt.hyperparameters() == before_h  # every level kept its value, even Adam with momentum
    for p, b in zip(model.parameters(), before_w, strict=True):
        assert torch.isfinite(p).all() and not torch.equal(p, b)  # the weights still took their step
    for batch in data[4:]:
        _step(model, opt, batch)
    assert opt.skipped_hyper_updates() == [1] * opt.height
    after = opt.hyperparameters()
    assert after[0]["lr"] != before_h[0]["lr"] and all(math.isfinite(v["lr"]) for v in after)


class _Bag(nn.Module):
    """An embedding of which the batches use only the first rows: the others get exact-zero gradients."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx))).squeeze(-1)


@pytest.mark.parametrize(
    "spec",
    [
        "adam(lr=0.05,learn=lr+beta1+beta2)/adam(lr=0.01)",
        "adamw(lr=0.05,learn=lr+beta2+weight_decay)/adam(lr=0.01)",
        "rmsprop(lr=0.05,learn=lr+alpha)/adam(lr=0.01)",
        "adagrad(lr=0.05,weight_decay=0.001,learn=lr+weight_decay)/adam(lr=0.01)",
        "sgd(lr=0.1,momentum=0.5,learn=lr+momentum)/adam(lr=0.01)",
    ],
)
def test_exact_zero_gradient_rows_give_finite_hypergradients(spec, float64):
    model = _Bag()
    unused = model.emb.weight[4:].detach().clone()
    opt = hh.tower(model.parameters(), spec)
    g = torch.Generator().manual_seed(2)
    start = opt.hyperparameters()[0]
    for _ in range(15):
        idx = torch.randint(0, 4, (8,), generator=g)
        loss = F.mse_loss(model(idx), idx.double() / 4)
        loss.backward()
        assert model.emb.weight.grad[4:].eq(0).all()
        opt.step()
        opt.zero_grad()
    assert opt.skipped_hyper_updates() == [0]
    end = opt.hyperparameters()[0]
    for name in start:
        assert math.isfinite(end[name]) and end[name] != start[name], name
    if "weight_decay" not in spec:
        assert torch.equal(model.emb.weight[4:].detach(), unused)


@pytest.mark.parametrize("spec", ["sgd(lr=0.05)/sgd(lr=0.01)", "adam(lr=0.01)/adam(lr=0.01)"])
def test_step_closure_returns_the_loss_like_torch_optim(spec, float64, make_mlp, batches):
    ((x, y),) = batches(1)
    model, twin = make_mlp(), make_mlp()
    opt = hh.tower(model.parameters(), spec)
    twin_opt = hh.tower(twin.parameters(), spec)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        out = opt.step(closure)
        assert isinstance(out, torch.Tensor) and out.item() == pytest.approx(F.mse_loss(twin(x), y).item())
        _step(twin, twin_opt, (x, y))
    assert len(calls) == 3
    assert opt.hyperparameters() == twin_opt.hyperparameters()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt.step() is None


def test_params_without_grad_are_left_alone(float64, make_mlp, batches):
    model = make_mlp()
    frozen = nn.Parameter(torch.ones(3))  # never in the graph: its grad stays None
    opt = hh.HyperAdam([*model.parameters(), frozen], lr=0.01)
    for batch in batches(4):
        _step(model, opt, batch)
    assert frozen.grad is None and torch.equal(frozen.detach(), torch.ones(3))
    assert len(opt.state[frozen]) == 0
    assert opt.skipped_hyper_updates() == [0]


def test_a_step_without_grad_contributes_nothing_to_later_hypergradients(float64):
    """A parameter that sits out a step does not move in it, so its tangent for that step is zero.

    For SGD a zero gradient also leaves the weights in place, so ``grad=None`` and ``grad=0`` must
    give the same learned step sizes; a stale tangent from an earlier step would make them differ."""

    def run(skip: str) -> list[float]:
        torch.manual_seed(0)
        a, b = nn.Linear(3, 2), nn.Linear(3, 2)
        opt = hh.tower([*a.parameters(), *b.parameters()], "sgd(lr=0.1)/sgd(lr=0.1)")
        x = torch.randn(5, 3)
        trajectory = []
        for t in range(5):
            loss = a(x).pow(2).sum() + (0.0 if t == 2 else b(x).sin().sum())
            loss.backward()
            if t == 2 and skip == "zeros":
                for p in b.parameters():
                    p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
            trajectory.append(opt.hyperparameters()[0]["lr"])
        return trajectory

    skipped, zeros = run("none"), run("zeros")
    assert skipped == pytest.approx(zeros, rel=1e-12)
    assert zeros[-1] != zeros[2]


@pytest.mark.parametrize("spec", ["sgd(lr=0.1)/sgd(lr=1e6)", "adam(lr=0.01)/adam(lr=100)", "sgd(lr=0.1)/sgd(lr=-0)"])
def test_learned_lr_stays_positive_in_default_mode(spec, float64, make_mlp, batches):
    model = make_mlp()
    opt = hh.tower(model.parameters(), spec)
    for batch in batches(20):
        model.zero_grad()
        F.mse_loss(model(batch[0]), batch[1]).backward()
        opt.step()
        lr = opt.hyperparameters()[0]["lr"]
        assert 0 < lr < math.inf


def test_gdtuo_mode_lets_lr_go_negative(float64, make_mlp, batches):
    """The contrast that makes the test above meaningful: the reference's raw lr can cross zero."""
    model = make_mlp()
    opt = hh.tower(model.parameters(), "sgd(lr=0.1)/sgd(lr=10)", compat="gdtuo")
    lrs = []
    for batch in batches(20):
        _step(model, opt, batch)
        lrs.append(opt.hyperparameters()[0]["lr"])
    assert min(lrs) < 0


@pytest.mark.parametrize("scope", ["shared", "group", "tensor"])
def test_add_param_group_before_the_first_step(scope, float64, make_mlp, batches):
    model = make_mlp()
    # No ramp: the test is about the groups, and ten steps from the ramp's small start barely train.
    opt = hh.HyperSGD([model[0].weight, model[0].bias], lr=0.05, scope=scope, hyper="adam(lr=0.05,normalize=true)")
    opt.add_param_group({"params": [model[2].weight, model[2].bias]})
    assert opt.schedule_base(1) == 0.05 and "initial_lr" not in opt.param_groups[1]  # a scheduler's key
    losses = [_step(model, opt, batch) for batch in batches(10)]
    assert losses[-1] < losses[0]
    assert all(p.grad is None and opt.state[p] for p in model.parameters())


def test_add_param_group_after_the_first_step(float64, make_mlp, batches):
    """Shared scope: the new group trains with the learned lr. Per-group scopes refuse, saying why."""
    data = batches(6)
    model = make_mlp()
    opt = hh.HyperSGD([model[0].weight, model[0].bias], lr=0.05)
    for batch in data[:3]:
        _step(model, opt, batch)
    late = model[2].weight.detach().clone()
    opt.add_param_group({"params": [model[2].weight, model[2].bias]})
    for batch in data[3:]:
        _step(model, opt, batch)
    assert not torch.equal(model[2].weight.detach(), late) and opt.skipped_hyper_updates() == [0]
    with pytest.raises(ValueError, match=r"\[0\.05, 0\.05, 0\.1\].*scope='group'"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": 0.1})
    assert len(opt.param_groups) == 2  # the refused group was not kept

    per_group = hh.HyperSGD([model[0].weight], lr=0.05, scope="group")
    _step(model, per_group, data[0])
    with pytest.raises(ValueError, match="scope='group'.*before the first step"):
        per_group.add_param_group({"params": [model[0].bias]})


def test_unsupported_parameters_are_refused_clearly():
    with pytest.raises(ValueError, match="complex"):
        hh.HyperAdam([nn.Parameter(torch.randn(3, dtype=torch.complex64))], lr=0.1)
    emb = nn.Embedding(5, 3, sparse=True)
    opt = hh.HyperSGD(emb.parameters(), lr=0.1)
    emb(torch.tensor([0, 1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_deepcopy_continues_identically(float64, make_mlp, batches):
    data = batches(6)
    model = make_mlp()
    opt = hh.tower(model.parameters(), "adam(lr=0.01)/adam(lr=0.01)/sgd(lr=0.001)")
    for batch in data[:3]:
        _step(model, opt, batch)
    twin = copy.deepcopy({"model": model, "opt": opt})
    for batch in data[3:]:
        _step(model, opt, batch)
        _step(twin["model"], twin["opt"], batch)
    assert twin["opt"].hyperparameters() == opt.hyperparameters()
    for p, q in zip(model.parameters(), twin["model"].parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(("dtype", "lr"), [(torch.float16, 1e-3), (torch.float32, 1e-20)])
def test_the_ramp_sizes_itself_where_the_probe_step_is_below_the_dtype(dtype, lr):
    """The probe moves the weights by a millionth of the initial lr's step, which float16 weights round to
    zero, and whose square float32 cannot hold for an lr of 1e-20: the ramp must still size itself and
    climb instead of probing for ever (the weights never moved before)."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(64).to(dtype))
    start = p.detach().clone()
    opt = hh.HyperAdam([p], lr=lr)
    lrs = []
    for _ in range(40):
        p.grad = p.detach().clone()  # the gradient of |p|^2 / 2
        opt.step()
        lrs.append(opt.hyperparameters()[0]["lr"])
    assert opt._tower_state.ramp.sized
    # The ramp climbs; once the weights sit near the minimum the level above may bring the lr down again.
    assert max(lrs) > 100 * lr
    assert not torch.equal(p.detach(), start)


def test_a_probe_without_a_gradient_is_retried_larger_but_never_past_its_limit():
    from hf_hyperopt.optim.ramp import RAMP_PROBE, RAMP_PROBE_LIMIT, RAMP_PROBE_RETRY

    p = nn.Parameter(torch.randn(8))
    opt = hh.HyperAdam([p], lr=1e-3)
    factors = []
    for _ in range(5):  # an all-zero gradient: Adam's step is zero, so the probe moves nothing
        p.grad = torch.zeros_like(p)
        opt.step()
        factors.append(opt._tower_state.ramp.factor.item())
    assert not opt._tower_state.ramp.sized
    assert factors == pytest.approx([RAMP_PROBE * RAMP_PROBE_RETRY] + [RAMP_PROBE_LIMIT] * 4)
    p.grad = p.detach().clone()
    opt.step()
    assert opt._tower_state.ramp.sized


def test_a_warm_up_does_not_move_the_ramps_start():
    """The ramp's target is where an unscheduled step moves the weights by ``ramp`` of their norm: a
    schedule whose factor is 0.01 at the probe step (a warm-up) must not set it a hundred times higher,
    for the factor multiplies the learned lr afterwards (it did: a pretrained model then took steps of
    1% of its norm once the warm-up ended)."""
    targets = []
    for first_factor in (1.0, 0.01):
        torch.manual_seed(0)
        model = nn.Linear(16, 16)
        x = torch.randn(32, 16)
        opt = hh.HyperAdam(model.parameters(), lr=1.0, hyper="adam(lr=0.05,ramp=0.001,normalize=true)")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t, f=first_factor: min(1.0, f + t / 10))
        model(x).square().mean().backward()
        opt.step()
        sched.step()
        targets.append(opt._tower_state.ramp.target.item())
    assert targets[1] == pytest.approx(targets[0], rel=1e-5)


def test_a_warm_up_from_zero_takes_the_probe_again_at_its_size():
    """HF's warm-ups start at a factor of 0: the probe moves nothing because of the schedule, not because it
    is too small, so it is taken again as it was (not a thousand times larger) once the factor is above 0."""
    from hf_hyperopt.optim.ramp import RAMP_PROBE

    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    opt = hh.HyperAdam(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, t / 10))
    for sized in (False, True):
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        assert opt._tower_state.ramp.sized is sized
        if not sized:
            assert opt._tower_state.ramp.factor.item() == pytest.approx(RAMP_PROBE)


def _two_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    return model, [{"params": model[0].parameters()}, {"params": model[1].parameters()}]


def _train_step(model, opt):
    model(torch.randn(8, 4)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def test_a_scheduler_that_gives_groups_different_bases_is_refused_under_one_shared_lr():
    """OneCycleLR(max_lr=[...]) gives each group its own base lr: one shared learned lr ran every group at
    group 0's (the second moved 100x more than under torch.optim); a group at lr 0 hit log(0)."""
    model, groups = _two_groups()
    opt = hh.HyperAdam(groups, lr=1e-2)
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1e-1, 1e-3], total_steps=10, cycle_momentum=False)
    with pytest.raises(ValueError, match=r"different base lrs \(group\['initial_lr'\]: \[0.004, 4e-05\]\)"):
        _train_step(model, opt)
    model, groups = _two_groups()
    opt = hh.HyperAdam(groups, lr=1e-2, scope="group")  # one lr per group: each keeps its own base
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1e-1, 1e-3], total_steps=10, cycle_momentum=False)
    _train_step(model, opt)
    model, groups = _two_groups()
    opt = hh.HyperAdam(groups, lr=1e-2, scope="group")
    opt.param_groups[1]["lr"] = 0.0
    torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    with pytest.raises(ValueError, match=r"param group 1's base lr is 0.0 .* must be positive"):
        _train_step(model, opt)


@pytest.mark.parametrize("learn", ["lr+beta1", "lr+weight_decay"])
def test_a_write_to_a_learned_group_value_is_refused(learn):
    """OneCycleLR's cycle_momentum rewrites group["betas"] every step; the tower learns beta1 and ignored it
    (param_groups then showed a value not in use). The same for a hand-set weight_decay."""
    model, groups = _two_groups()
    opt = hh.HyperAdamW(groups, lr=1e-2, learn=learn)
    _train_step(model, opt)
    before = copy.deepcopy(opt.state_dict())
    if learn == "lr+beta1":
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)  # cycle_momentum by default
        match = r"param group 0's beta1 was set to .* cycle_momentum=False\), or do not learn beta1"
    else:
        opt.param_groups[1]["weight_decay"] = 0.5
        match = r"param group 1's weight_decay was set to 0.5 after the tower began learning it from 0.01"
    with pytest.raises(ValueError, match=match):
        _train_step(model, opt)
    opt.load_state_dict(before)  # loading takes the groups' values afresh, and the run goes on
    _train_step(model, opt)


def test_learned_values_are_checked_where_they_start_and_in_groups_added_later():
    """Set between construction and the first step, a group's value was taken unchecked: under one shared
    weight_decay group 1's 0.5 was ignored; a momentum of 0 failed in math.log. A group added after the
    first step was not watched for writes."""
    model, groups = _two_groups()
    opt = hh.HyperAdamW(groups, lr=1e-2, learn="lr+weight_decay")
    opt.param_groups[1]["weight_decay"] = 0.5
    with pytest.raises(ValueError, match=r"scope='shared' learns one weight_decay .* start at \[0.01, 0.5\]"):
        _train_step(model, opt)
    model, groups = _two_groups()
    opt = hh.HyperSGD(groups, lr=1e-2, momentum=0.9, learn="lr+momentum", scope="group")
    opt.param_groups[0]["momentum"] = 0.0
    with pytest.raises(ValueError, match=r"cannot learn momentum=0.0"):
        _train_step(model, opt)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = hh.HyperAdam(model[0].parameters(), lr=1e-2, learn="lr+beta1")
    _train_step(model, opt)
    opt.add_param_group({"params": model[1].parameters()})
    opt.param_groups[1]["betas"] = (0.5, 0.999)
    with pytest.raises(ValueError, match=r"param group 1's beta1 was set to 0.5"):
        _train_step(model, opt)
