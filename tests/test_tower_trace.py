"""The horizon trace: ``Z_t = mu * Z_{t-1} + dw_{t+1}/dtheta_t`` and ``h_t = <g_{t+1}, Z_t>``, against
written-out references; ``trace=0`` is the one-step hypergradient."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from sgd_reference import dot, grads, step_both

import hf_hyperopt as hh
from hf_hyperopt.optim.engine import TowerOptimizer
from hf_hyperopt.optim.optimizers import default_hyper
from hf_hyperopt.optim.spec import parse_spec


@pytest.mark.parametrize("mu", [0.0, 0.5, 0.9])
def test_sgd_lr_learned_from_a_trace_of_updates(mu, float64, make_mlp, batches):
    """SGD weights with log(lr) learned by SGD(kappa): dw_{t+1}/dlog(lr) is the update u_t itself, so the
    trace is Z_t = mu Z_{t-1} + u_t and log(lr) moves by -kappa <g_{t+1}, Z_t>."""
    kappa = 0.5
    model = make_mlp()
    opt = hh.tower(model.parameters(), f"sgd(lr=0.05)/sgd(lr={kappa},trace={mu})")
    z, log_lr = None, math.log(0.05)
    for x, y in batches(12):
        F.mse_loss(model(x), y).backward()
        g = grads(model)
        if z is not None:
            log_lr -= kappa * dot(g, z)
        update = [-math.exp(log_lr) * t for t in g]
        z = update if z is None else [mu * a + b for a, b in zip(z, update, strict=True)]
        opt.step()
        opt.zero_grad()
        assert math.log(opt.hyperparameters()[0]["lr"]) == pytest.approx(log_lr, rel=1e-10, abs=1e-12)
    assert log_lr != pytest.approx(math.log(0.05), abs=1e-3)


def test_adam_trace_matches_the_sum_over_a_horizon(float64, make_mlp, batches):
    """Adam weights: with the upper step size zero for the first steps the lr is constant, and the
    hypergradient the upper level receives is <g_{t+1}, sum_s mu^(t-s) u_s> over Adam's own updates."""
    mu, kappa = 0.8, 1e-3
    model = make_mlp()
    ref = make_mlp()
    opt = hh.tower(model.parameters(), f"adam(lr=0.01)/sgd(lr={kappa},trace={mu})")
    torch_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    z, log_lr = None, math.log(0.01)
    for x, y in batches(10):
        F.mse_loss(model(x), y).backward()
        F.mse_loss(ref(x), y).backward()
        g = grads(ref)
        if z is not None:
            log_lr -= kappa * dot(g, z)
        for group in torch_opt.param_groups:
            group["lr"] = math.exp(log_lr)
        before = [p.detach().clone() for p in ref.parameters()]
        torch_opt.step()
        update = [p.detach() - b for p, b in zip(ref.parameters(), before, strict=True)]
        z = update if z is None else [mu * a + b for a, b in zip(z, update, strict=True)]
        opt.step()
        opt.zero_grad()
        torch_opt.zero_grad()
        assert math.log(opt.hyperparameters()[0]["lr"]) == pytest.approx(log_lr, rel=1e-9, abs=1e-12)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_trace_on_a_level_above_the_first(float64, make_mlp, batches):
    """A trace on level 2 decays the tangents of level 1's learned step size: with trace 0 it is the
    one-step chain, and a trace changes what level 2 learns while every value stays finite."""
    finals = {}
    for mu in (0.0, 0.9):
        model = make_mlp()
        opt = hh.tower(model.parameters(), f"sgd(lr=0.05)/sgd(lr=0.1)/sgd(lr=0.1,trace={mu})")
        for x, y in batches(15):
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        hp = opt.hyperparameters()
        assert all(math.isfinite(v) for level in hp for v in level.values())
        finals[mu] = hp[1]["lr"]
    assert finals[0.0] != pytest.approx(finals[0.9], rel=1e-6)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("adam(trace=0.9)/adam", r"level 0 \(adam\): trace=0.9 belongs to a level above the weights"),
        ("adam/adam(trace=1.0)", r"level 1 \(adam\): trace=1.0 is neither a decay in \[0, 1\) nor 'auto'"),
        ("adam/adam(trace=-0.1)", r"trace=-0.1 is neither a decay in \[0, 1\) nor 'auto'"),
        ("adam/adam(trace=x)", r"trace='x' for adam in 'adam/adam\(trace=x\)' is neither a decay in \[0, 1\) nor"),
        ("adam(trace=auto)/adam", r"level 0 \(adam\): trace='auto' belongs to a level above the weights"),
        ("adam/adam/adam(ramp=0.5)", r"level 2 \(adam\): ramp=0.5 applies to the weights' learned lr"),
        ("adam/adam(ramp=1.0)", r"ramp=1.0 is outside \[0, 1\)"),
        ("adam(learn=beta1)/adam(ramp=0.1)", r"ramp=0.1 ramps the weights' learned lr, but level 0 learns beta1"),
        ("adam(normalize=true)/adam", r"level 0 \(adam\): normalize=true belongs to a level above the weights"),
        ("adam/adam(normalize=maybe)", r"normalize='maybe' for adam .* is not a boolean"),
        ("adam/adam(cosine=1.5)", r"level 1 \(adam\): cosine=1.5 is outside \[0, 1\]"),
        ("adam(cosine=0.5)/adam", r"level 0 \(adam\): cosine=0.5 divides by the weights' next gradient"),
        ("adam/adam/adam(cosine=0.5)", r"level 2 \(adam\): cosine=0.5 divides by the weights' next gradient"),
        ("adam(timescale=100)/adam", r"level 0 \(adam\): timescale=100.0 shrinks the step size of a level above"),
        ("adam/adam(timescale=-1)", r"level 1 \(adam\): timescale=-1.0 must be a number of steps >= 0"),
        ("adam/adam(timescale=nan)", r"timescale=nan must be a number of steps >= 0"),
    ],
)
def test_bad_level_option_is_refused_with_the_value(spec, match):
    with pytest.raises(ValueError, match=match):
        hh.tower([torch.zeros(2, requires_grad=True)], spec)


def test_level_options_in_a_hyper_spec_belong_to_the_levels_above():
    """``hyper=`` is parsed on its own, so its first level is level 1 of the tower: the options are accepted there."""
    opt = hh.HyperAdam([torch.zeros(2, requires_grad=True)], hyper="adam(lr=0.05,normalize=true,trace=0.9,ramp=0.001)")
    assert opt.spec == "adam/adam(lr=0.05,trace=0.9,ramp=0.001,normalize=true)"
    with pytest.raises(ValueError, match=r"level 2 \(sgd\): ramp=0.5 applies to the weights' learned lr"):
        hh.HyperAdam([torch.zeros(2, requires_grad=True)], hyper="adam/sgd(ramp=0.5)")


@pytest.mark.parametrize("options", ["trace=0.9", "trace=auto", "timescale=100", "timescale=12.5"])
def test_level_options_round_trip_through_the_spec(options):
    opt = hh.tower([torch.zeros(2, requires_grad=True)], f"adam(lr=0.001)/adam(lr=0.05,{options})")
    assert opt.spec == f"adam(lr=0.001)/adam(lr=0.05,{options})"
    assert hh.tower([torch.zeros(2, requires_grad=True)], opt.spec).spec == opt.spec


def test_a_level_built_directly_with_an_integer_timescale_saves_its_spec():
    bottom, top = parse_spec("adam(lr=0.001)/adam(lr=0.05)")
    w = torch.nn.Parameter(torch.ones(3))
    opt = TowerOptimizer([w], [bottom, dataclasses.replace(top, timescale=100)])
    w.grad = torch.ones(3)
    opt.step()
    assert opt.spec == "adam(lr=0.001)/adam(lr=0.05,timescale=100)"
    assert opt.state_dict()["param_groups"][0]["hyper_tower"]


def _trained(spec: str, make_mlp, data, horizon: int | None = None) -> tuple[TowerOptimizer, list[torch.Tensor]]:
    model = make_mlp()
    opt = hh.tower(model.parameters(), spec)
    if horizon is not None:
        opt.set_horizon(horizon)
    for x, y in data:
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return opt, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("horizon", [1, 7, 300])
def test_trace_auto_decays_by_one_over_the_horizon(horizon, make_mlp, batches):
    """trace=auto with set_horizon(n) is trace=1-1/n, step for step (n=1: the one-step hypergradient)."""
    top = "adam(lr=0.05,beta1=0,trace={},ramp=0.001,normalize=true,ramp_search=0.3,timescale=100)"
    data = batches(12)
    auto, auto_weights = _trained("adam(lr=0.01)/" + top.format("auto"), make_mlp, data, horizon)
    written = top.format(1 - 1 / horizon) if horizon > 1 else top.replace("trace={},", "")  # 1: no trace
    given, given_weights = _trained("adam(lr=0.01)/" + written, make_mlp, data)
    assert auto.horizon == horizon and given.horizon is None
    assert auto.uses_horizon and not given.uses_horizon
    assert auto.hyperparameters() == given.hyperparameters()
    for p, q in zip(auto_weights, given_weights, strict=True):
        assert torch.equal(p, q)
    if horizon == 7:  # the horizon is what the trace is: another gives other steps
        other, _ = _trained("adam(lr=0.01)/" + top.format("auto"), make_mlp, data, 300)
        assert other.hyperparameters()[0]["lr"] != auto.hyperparameters()[0]["lr"]


def test_trace_auto_without_a_horizon_warns_once_and_spans_100_steps(make_mlp, batches):
    data = batches(6)
    with pytest.warns(
        UserWarning, match=r"trace=auto .* no horizon was set: it spans 100 steps; call set_horizon"
    ) as w:
        auto, _ = _trained("sgd(lr=0.05)/adam(lr=0.05,trace=auto)", make_mlp, data)
    assert len(w) == 1
    given, _ = _trained("sgd(lr=0.05)/adam(lr=0.05,trace=0.99)", make_mlp, data)
    assert auto.hyperparameters() == given.hyperparameters()


def test_trace_auto_loaded_from_a_state_dict_still_warns_without_a_horizon(make_mlp, batches):
    data = batches(4)
    saved, _ = _trained("sgd(lr=0.05)/adam(lr=0.05,trace=auto)", make_mlp, data, horizon=3)
    model = make_mlp()
    opt = hh.tower(model.parameters(), "sgd(lr=0.05)/adam(lr=0.05,trace=auto)")
    opt.load_state_dict(saved.state_dict())
    x, y = data[0]
    F.mse_loss(model(x), y).backward()
    with pytest.warns(UserWarning, match=r"and again after loading a state dict"):
        opt.step()


def test_set_horizon_takes_integers_of_any_kind():
    """Counts come as numpy integers or 0-d tensors (len of a sampler, a reduced step count)."""
    import numpy as np

    opt = hh.tower([torch.zeros(2, requires_grad=True)], "adam/adam(trace=auto)")
    for steps in (np.int64(7), torch.tensor(9)):
        opt.set_horizon(steps)
        assert opt.horizon == int(steps) and type(opt.horizon) is int


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "94", None, torch.tensor(2.5), torch.tensor(0), torch.tensor(True)])
def test_set_horizon_refuses_what_is_not_a_number_of_steps(bad):
    opt = hh.tower([torch.zeros(2, requires_grad=True)], "adam/adam(trace=auto)")
    with pytest.raises(ValueError, match=r"set_horizon\(steps=.*\): give a whole number of optimizer steps >= 1"):
        opt.set_horizon(bad)
    assert opt.horizon is None


def test_normalized_hypergradient_is_the_slope_along_the_update(float64, make_mlp, batches):
    """normalize=true hands the level above <g_{t+1}, u_t> / |u_t| instead of <g_{t+1}, u_t>."""
    kappa = 0.3
    model = make_mlp()
    opt = hh.tower(model.parameters(), f"sgd(lr=0.05)/sgd(lr={kappa},normalize=true)")
    previous, log_lr = None, math.log(0.05)
    for x, y in batches(12):
        F.mse_loss(model(x), y).backward()
        g = grads(model)
        if previous is not None:
            log_lr -= kappa * dot(g, previous) / math.sqrt(dot(previous, previous))
        previous = [-math.exp(log_lr) * t for t in g]
        opt.step()
        opt.zero_grad()
        assert math.log(opt.hyperparameters()[0]["lr"]) == pytest.approx(log_lr, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("c", [0.5, 1.0])
def test_cosine_divides_the_slope_by_the_next_gradients_norm(c, float64, make_mlp, batches):
    """cosine=c with normalize=true hands the level above <g_{t+1}, u_t> / (|u_t| |g_{t+1}|^c); the spec round-trips."""
    kappa = 0.3
    model = make_mlp()
    opt = hh.tower(model.parameters(), f"sgd(lr=0.05)/sgd(lr={kappa},normalize=true,cosine={c})")
    assert opt.spec == f"sgd(lr=0.05)/sgd(lr={kappa},normalize=true,cosine={c})"
    previous, log_lr = None, math.log(0.05)
    for x, y in batches(12):
        F.mse_loss(model(x), y).backward()
        g = grads(model)
        if previous is not None:
            log_lr -= kappa * dot(g, previous) / math.sqrt(dot(previous, previous)) / dot(g, g) ** (c / 2)
        previous = [-math.exp(log_lr) * t for t in g]
        opt.step()
        opt.zero_grad()
        assert math.log(opt.hyperparameters()[0]["lr"]) == pytest.approx(log_lr, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize(("lr", "tau"), [(0.05, 1e-3), (1e-6, 1e-3), (1e-4, 1e-2)])
def test_ramp_probes_sizes_and_approaches(lr, tau, float64, make_mlp, batches):
    """ramp=tau: step 1 is a probe at 1e-6 lr; the target is the step size at which one step moves the
    weights by tau of their norm. A larger lr starts there; a smaller one doubles every step up to it,
    whatever the hypergradient says. The level above learns the lr only once the target is reached."""
    kappa = 0.5
    model, plain = make_mlp(), make_mlp()
    opt = hh.tower(model.parameters(), f"sgd(lr={lr})/sgd(lr={kappa},ramp={tau})")
    assert opt.hyperparameters()[0]["lr"] == pytest.approx(lr * 1e-6)
    ref = torch.optim.SGD(plain.parameters(), lr=lr * 1e-6)
    previous, factor, target, log_lr, active, grew, learned = None, 1e-6, None, math.log(lr), True, 0, 0
    for x, y in batches(24):
        F.mse_loss(model(x), y).backward()
        F.mse_loss(plain(x), y).backward()
        g = grads(plain)
        if previous is not None:
            if active:  # the approach does not read the hypergradient
                factor, grew = min(target, 2 * factor), grew + 1
                active = factor < target
            else:
                log_lr, learned = log_lr - kappa * dot(g, previous), learned + 1  # dL/dlog(lr)
        probe = previous is None
        previous, factor, target = step_both(opt, model, ref, plain, log_lr, factor, target, tau)
        if probe:
            active = factor < target
    assert not active and learned >= 5  # the target was reached and the level above took over
    if lr > 1e-3:
        assert grew == 0 and target < 1.0  # a too-large lr starts at the target: no step at lr
    else:
        assert grew == math.ceil(math.log2(target)) and target > 1.0  # doubled up to the target


def test_ramp_keeps_the_initial_lr_of_weights_that_are_all_zero(batches):
    """Zero weights have no scale to size a step by: after the probe the lr is the one given."""
    model = torch.nn.Linear(8, 2)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    opt = hh.tower(model.parameters(), "adam(lr=0.01)/adam(lr=0.05,ramp=0.001)")
    x = torch.randn(4, 8)
    for _ in range(2):
        F.mse_loss(model(x), torch.ones(4, 2)).backward()
        opt.step()
        opt.zero_grad()
    assert opt._tower_state.ramp.factor.item() == 1.0 and not opt._tower_state.ramp.active.item()


def test_ramp_survives_a_checkpoint(make_mlp, batches):
    model = make_mlp()
    opt = hh.tower(model.parameters(), "adam(lr=0.01)/adam(lr=0.05,ramp=0.001)")
    for x, y in batches(4):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    other = hh.tower(make_mlp().parameters(), "adam(lr=0.01)/adam(lr=0.05,ramp=0.001)")
    other.load_state_dict(opt.state_dict())
    assert other.hyperparameters() == opt.hyperparameters()
    # Saved before the ramp had a target (its search ended): it loads, and the factor stays.
    sd = opt.state_dict()
    del sd["param_groups"][0]["hyper_tower"]["state.ramp_target"]
    other.load_state_dict(sd)
    assert other.hyperparameters() == opt.hyperparameters()
    assert other._tower_state.ramp.target.item() == opt._tower_state.ramp.factor.item()


@pytest.mark.parametrize("key", ["ramp", "ramp_target"])
@pytest.mark.parametrize("bad", [float("nan"), 0.0, -1.0])
def test_a_damaged_ramp_factor_is_refused_on_load(bad, key, make_mlp, batches):
    model = make_mlp()
    opt = hh.tower(model.parameters(), "adam(lr=0.01)/adam(lr=0.05,ramp=0.001)")
    x, y = batches(1)[0]
    F.mse_loss(model(x), y).backward()
    opt.step()
    sd = opt.state_dict()
    sd["param_groups"][0]["hyper_tower"]["state." + key].fill_(bad)
    before = opt.hyperparameters()
    with pytest.raises(ValueError, match="ramp factor" if key == "ramp" else "ramp target"):
        opt.load_state_dict(sd)
    assert opt.hyperparameters() == before


def test_the_default_tower_ramps_only_a_learned_lr():
    """The default's ramp sizes the learned lr: a weight level that learns only momentum gets the default
    without it (not an error about an option the user never wrote); one that learns lr keeps it."""
    w = [torch.zeros(2, requires_grad=True)]
    assert hh.HyperSGD(w, lr=0.1, momentum=0.5, learn="momentum").levels[1].ramp == 0.0
    assert hh.HyperSGD(w, lr=0.1, momentum=0.5, learn="lr+momentum").levels[1].ramp == 1e-3
    (top,) = parse_spec(hh.DEFAULT_HYPER["default"])
    without_ramp = dataclasses.replace(top, ramp=0.0, ramp_search=0.0).to_spec()
    assert "ramp" not in without_ramp and default_hyper(learn="momentum") == without_ramp
    args = hh.HyperTrainingArguments(
        output_dir="o", optim="hyper_sgd", optim_args="momentum=0.9", hyper_learn="momentum", report_to="none"
    )
    assert args.hyper_settings.tower == without_ramp
    with pytest.raises(ValueError, match="ramp=0.001 ramps the weights' learned lr"):  # written by the user: refused
        hh.HyperSGD(w, lr=0.1, momentum=0.5, learn="momentum", hyper="adam(ramp=0.001)")


@pytest.mark.parametrize("scope", ["shared", "tensor"])
def test_cosine_divides_each_units_hypergradient_by_its_gradient_norm(scope, float64, make_mlp, batches, monkeypatch):
    """With two learned names and per-tensor units, cosine=c divides each entry of h by |g_unit|^c. The
    level above has step size 0, so the towers with and without it take the same steps and see the same
    hypergradients up to that factor (from step 3 on the momentum's too: the buffer is zero at step 1)."""
    from hf_hyperopt.optim import hypergradients

    c, data = 0.5, batches(3)
    seen: dict[float, torch.Tensor] = {}
    for cosine in (0.0, c):
        model = make_mlp()
        option = f",cosine={cosine}" if cosine else ""
        opt = hh.tower(
            model.parameters(),
            f"sgd(lr=0.05,momentum=0.9,learn=lr+momentum)/sgd(lr=0.0,normalize=true{option})",
            scope=scope,
        )
        captured = []
        guard = hypergradients.guard
        monkeypatch.setattr(
            hypergradients, "guard", lambda h, *a, out=captured, real=guard: out.append(h.clone()) or real(h, *a)
        )
        for x, y in data:
            F.mse_loss(model(x), y).backward()
            last = grads(model)
            opt.step()
            opt.zero_grad()
        monkeypatch.undo()
        seen[cosine] = captured[-1]
    norms = [dot([g], [g]) for g in last] if scope == "tensor" else [dot(last, last)]
    factor = torch.tensor(norms * 2, dtype=torch.float64) ** (c / 2)
    assert seen[0.0].abs().min() > 0
    torch.testing.assert_close(seen[c] * factor, seen[0.0], rtol=1e-10, atol=0)
