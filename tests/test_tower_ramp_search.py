"""``ramp_search=n``: past the ramp's target the lr keeps doubling while its hypergradient asks for a
larger one (at most ``n`` times); at the first step where it does not, or at the cap, the factor goes
back to half the largest one accepted and the level above, which left the lr alone meanwhile, learns it
from there."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hf_hyperopt as hh
from hf_hyperopt.optim import engine
from hf_hyperopt.optim.ramp import RampState, advance_ramp
from hf_hyperopt.optim.spec import parse_spec


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _dot(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    return sum(float((a * b).sum()) for a, b in zip(xs, ys, strict=True))


def _sized(factor: float, target: float, search: int) -> RampState:
    """A ramp just after its probe: at ``factor``, approaching ``target`` if below it."""
    ramp = RampState.start(torch.float64, torch.device("cpu"), search=bool(search))
    ramp.factor.fill_(factor)
    ramp.target.fill_(target)
    ramp.active.fill_(factor < target)
    ramp.sized = True
    return ramp


def _run(ramp: RampState, signs: list[float], n: int) -> list[tuple[float, bool]]:
    """The factor after each call and whether the lr was held, for hypergradients ``signs`` in turn."""
    out = []
    for h in signs:
        held = advance_ramp(ramp, torch.device("cpu"), torch.tensor(h, dtype=torch.float64), n)
        out.append((ramp.factor.item(), bool(held)))
    return out


def test_search_from_the_target_doubles_while_the_hypergradient_agrees_then_backs_off():
    # Started at the target: the first call's hypergradient is the probe's (at a millionth of the lr), not judged.
    ramp = _sized(0.5, 0.5, search=10)
    got = _run(ramp, [-1.0, -1.0, -1.0, -1.0, 2.0, -1.0, 3.0], 10)
    assert got == [
        (0.5, True),  # the probe's hypergradient: the search begins with the step at the target
        (1.0, True),
        (2.0, True),
        (4.0, True),
        (1.0, True),  # disagrees at 4: back to half of 2, the last factor accepted
        (1.0, False),  # over for good: the level above learns the lr, whatever the sign
        (1.0, False),
    ]
    assert ramp.search.item() == 0


def test_search_follows_the_approach_and_never_goes_below_the_target():
    ramp = _sized(1.0, 3.0, search=10)  # from below: 2, then the target 3 (the approach ignores the sign)
    got = _run(ramp, [5.0, 5.0, -1.0, 1.0, -1.0], 10)
    assert got == [(2.0, True), (3.0, True), (6.0, True), (3.0, True), (3.0, False)]
    ramp = _sized(0.5, 0.5, search=10)  # disagrees at the target itself: stays there
    assert _run(ramp, [-1.0, 1.0, -1.0], 10) == [(0.5, True), (0.5, True), (0.5, False)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0])
def test_search_stops_on_a_hypergradient_that_does_not_ask_for_more(bad):
    ramp = _sized(0.5, 0.5, search=10)
    got = _run(ramp, [-1.0, -1.0, -1.0, bad, -1.0], 10)
    assert got == [(0.5, True), (1.0, True), (2.0, True), (0.5, True), (0.5, False)]
    assert all(math.isfinite(f) for f, _ in got)


def test_search_ends_at_its_cap_at_half_the_largest_factor_accepted():
    ramp = _sized(0.5, 0.5, search=2)
    got = _run(ramp, [-1.0] * 6, 2)
    assert got == [(0.5, True), (1.0, True), (2.0, True), (1.0, True), (1.0, False), (1.0, False)]


def test_without_search_the_ramp_is_unchanged():
    ramp = _sized(0.5, 0.5, search=0)
    assert ramp.search is None
    assert _run(ramp, [-1.0, -1.0], 0) == [(0.5, False), (0.5, False)]


@pytest.mark.parametrize(("lr", "n"), [(0.05, 20), (1e-6, 20), (0.05, 3)])
def test_search_against_a_written_out_reference(lr, n, float64, make_mlp, batches):
    """SGD weights, log(lr) learned by SGD(kappa): the probe, the approach, the search judged on
    dL/dlog(lr) = <g_{t+1}, u_t> of the step just taken, and the level above only once it is over."""
    kappa, tau = 0.5, 1e-3
    model, plain = make_mlp(), make_mlp()
    opt = hh.tower(model.parameters(), f"sgd(lr={lr})/sgd(lr={kappa},ramp={tau},ramp_search={n})")
    ref = torch.optim.SGD(plain.parameters(), lr=lr * 1e-6)
    previous, factor, target, log_lr, active, search = None, 1e-6, None, math.log(lr), True, -1
    grew, stopped, learned = 0, None, 0
    for x, y in batches(40):
        F.mse_loss(model(x), y).backward()
        F.mse_loss(plain(x), y).backward()
        g = _grads(plain)
        if previous is not None:
            h = _dot(g, previous)  # dL/dlog(lr) at the step just taken
            held = active or search != 0
            if search > 0:
                if h < 0 and search > 1:
                    factor, search, grew = 2 * factor, search - 1, grew + 1
                else:  # at half the largest factor accepted: this one at the cap, the one before else
                    factor = max(factor / (2 if h < 0 else 4), target)
                    search, stopped = 0, ("cap" if h < 0 else "disagreed")
            if active:
                factor = min(target, 2 * factor)
                active = factor < target
            if search < 0 and not active:
                search = n + 1
            if not held:
                log_lr, learned = log_lr - kappa * h, learned + 1
        for group in ref.param_groups:
            group["lr"] = math.exp(log_lr) * factor
        update = [-group["lr"] * t for t in g]
        weights = [p.detach().clone() for p in plain.parameters()] if previous is None else None
        ref.step()
        if previous is None:  # the probe sets the target
            w, u = math.sqrt(_dot(weights, weights)), math.sqrt(_dot(update, update))
            target = tau * w / u * factor
            factor = min(1.0, target)
            active = factor < target
        previous = update
        opt.step()
        opt.zero_grad()
        ref.zero_grad()
        assert opt.hyperparameters()[0]["lr"] == pytest.approx(math.exp(log_lr) * factor, rel=1e-10)
        for p, q in zip(model.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    # Both ways to end are exercised: a disagreement after some doublings, and the cap.
    assert stopped == ("cap" if n == 3 else "disagreed") and grew >= 2 and learned >= 5
    assert factor > target


def _train(opt, model, data):
    for x, y in data:
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


SPEC = "adam(lr=1e-4)/adam(lr=0.05,ramp=0.001,normalize=true,ramp_search=12)"


def test_search_survives_a_checkpoint_mid_search(tmp_path, make_mlp, batches):
    """Stopped mid-search, saved, loaded into fresh objects and continued: the run that never stopped."""
    data = batches(30)
    model = make_mlp()
    opt = hh.tower(model.parameters(), SPEC)
    _train(opt, model, data)
    first = make_mlp()
    opt1 = hh.tower(first.parameters(), SPEC)
    _train(opt1, first, data[:5])
    assert opt1._tower_state.ramp.search.item() > 0  # mid-search
    torch.save({"model": first.state_dict(), "optimizer": opt1.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert "state.ramp_search" in ckpt["optimizer"]["param_groups"][0]["hyper_tower"]
    second = make_mlp(seed=123)
    second.load_state_dict(ckpt["model"])
    opt2 = hh.tower(second.parameters(), SPEC)
    opt2.load_state_dict(ckpt["optimizer"])
    _train(opt2, second, data[5:])
    assert opt2.hyperparameters() == opt.hyperparameters()
    assert opt2._tower_state.ramp.search.item() == opt._tower_state.ramp.search.item() == 0
    assert torch.equal(opt2._tower_state.ramp.factor, opt._tower_state.ramp.factor)
    assert opt._tower_state.ramp.factor.item() > opt._tower_state.ramp.target.item()  # it searched past the target
    for p, q in zip(model.parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_checkpoint_without_a_search_loads_with_the_search_over(make_mlp, batches):
    """A state saved by a tower without ramp_search (or before the option): nothing to resume, the lr
    is learned as saved; a damaged entry is refused."""
    model = make_mlp()
    opt = hh.tower(model.parameters(), SPEC)
    _train(opt, model, batches(5))
    sd = opt.state_dict()
    entry = sd["param_groups"][0]["hyper_tower"]
    entry["state.ramp_search"] = torch.tensor([0.5])
    with pytest.raises(ValueError, match="ramp_search"):
        opt.load_state_dict(sd)
    del entry["state.ramp_search"]
    opt.load_state_dict(sd)
    assert opt._tower_state.ramp.search.item() == 0


def test_a_step_that_raises_mid_search_leaves_the_search_as_it_was(make_mlp, batches, monkeypatch):
    model = make_mlp()
    opt = hh.tower(model.parameters(), SPEC)
    data = batches(6)
    _train(opt, model, data[:5])
    ramp = opt._tower_state.ramp
    before = (ramp.factor.clone(), ramp.search.clone(), opt.hyperparameters())
    F.mse_loss(model(data[5][0]), data[5][1]).backward()

    def fail(opt, ts):
        raise RuntimeError("simulated")

    monkeypatch.setattr(engine, "step_weights", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step()
    assert torch.equal(ramp.factor, before[0]) and torch.equal(ramp.search, before[1])
    assert opt.hyperparameters() == before[2]


def test_the_spec_round_trips_and_bad_values_are_refused():
    (level,) = parse_spec("adam(lr=0.05,ramp=0.001,normalize=true,ramp_search=12)")
    assert level.ramp_search == 12 and isinstance(level.ramp_search, int)
    assert parse_spec(level.to_spec()) == [level]
    w = [torch.zeros(2, requires_grad=True)]
    assert hh.HyperAdam(w, hyper="adam(lr=0.05,ramp=0.001,ramp_search=3)").spec == "adam/adam(lr=0.05,ramp=0.001,ramp_search=3)"
    for spec, message in [
        ("adam(ramp=0.001,ramp_search=1.5)", "not a whole number"),
        ("adam(ramp=0.001,ramp_search=-1)", "not a whole number"),
        ("adam(ramp=0.001,ramp_search=61)", "not a whole number"),
        ("adam(ramp_search=4)", "needs ramp="),
        ("adam/adam(ramp_search=4)", "needs ramp="),
    ]:
        with pytest.raises(ValueError, match=message):
            hh.HyperAdam(w, hyper=spec)
