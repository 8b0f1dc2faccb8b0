"""``ramp_search=c``: past the ramp's target the lr keeps doubling while its hypergradient asks for a
larger one by more than noise (the cosine of the next gradient and the last update below ``-c``), at
most ``RAMP_SEARCH_DOUBLINGS`` times; at the first step where it does not, or at the cap, the factor
goes back to half the largest one accepted and the level above, which left the lr alone meanwhile,
learns it from there."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sgd_reference import dot, grads, step_both

import hf_hyperopt as hh
from hf_hyperopt.optim import engine, hypergradients
from hf_hyperopt.optim import ramp as ramp_module
from hf_hyperopt.optim.ramp import RampState, advance_ramp, asks_for_more
from hf_hyperopt.optim.spec import parse_spec


def _sized(factor: float, target: float, search: bool = True) -> RampState:
    """A ramp just after its probe: at ``factor``, approaching ``target`` if below it."""
    ramp = RampState.start(torch.float64, torch.device("cpu"), search=search)
    ramp.factor.fill_(factor)
    ramp.target.fill_(target)
    ramp.active.fill_(factor < target)
    ramp.sized = True
    return ramp


def _run(ramp: RampState, asks: list[bool]) -> list[tuple[float, bool]]:
    """The factor after each call and whether the lr was held, for whether each step's hypergradient asked for more."""
    out = []
    for more in asks:
        held = advance_ramp(ramp, torch.device("cpu"), torch.tensor([more]) if ramp.searching else None)
        out.append((ramp.factor.item(), bool(held)))
    return out


Y, N = True, False


def test_search_from_the_target_doubles_while_the_hypergradient_asks_for_more_then_backs_off():
    # Started at the target: the first call's hypergradient is the probe's (at a millionth of the lr), not judged.
    ramp = _sized(0.5, 0.5)
    got = _run(ramp, [Y, Y, Y, Y, N, Y, N])
    assert got == [
        (0.5, False),  # the probe's hypergradient: the search begins with the step at the target
        (1.0, True),
        (2.0, True),
        (4.0, True),
        (1.0, True),  # not at 4: back to half of 2, the largest factor accepted
        (1.0, False),  # over for good: the level above learns the lr, whatever the sign
        (1.0, False),
    ]
    assert ramp.search.item() == 0 and not ramp.searching


def test_search_follows_the_approach_and_never_goes_below_the_target():
    ramp = _sized(1.0, 3.0)  # from below: 2, then the target 3 (the approach ignores the hypergradient)
    assert _run(ramp, [N, N, Y, N, Y]) == [(2.0, True), (3.0, True), (6.0, True), (3.0, True), (3.0, False)]
    ramp = _sized(0.5, 0.5)  # not at the target itself: stays there, held no step (the plain ramp)
    assert _run(ramp, [Y, N, Y]) == [(0.5, False), (0.5, False), (0.5, False)]


def test_search_ends_at_its_cap_at_half_the_largest_factor_accepted(monkeypatch):
    monkeypatch.setattr(ramp_module, "RAMP_SEARCH_DOUBLINGS", 2)
    ramp = _sized(0.5, 0.5)
    got = _run(ramp, [Y] * 6)
    assert got == [(0.5, False), (1.0, True), (2.0, True), (1.0, True), (1.0, False), (1.0, False)]


def test_asks_for_more_by_more_than_noise():
    one = torch.tensor(1.0, dtype=torch.float64)
    h = torch.tensor(-0.5, dtype=torch.float64)  # the cosine of g and Z is -0.5
    assert asks_for_more(h, one, one, 0.3) and not asks_for_more(h, one, one, 0.6)
    assert not asks_for_more(-h, one, one, 0.3)
    for bad in (float("nan"), float("inf"), 0.0):  # a non-finite or zero hypergradient ends the search
        assert not asks_for_more(torch.tensor(bad, dtype=torch.float64), one, one, 0.3)
    assert not asks_for_more(torch.tensor(float("-inf"), dtype=torch.float64), one, torch.tensor(float("inf")), 0.3)


@pytest.mark.parametrize("lr", [1e-3, 0.1])
def test_weights_with_no_scale_keep_the_initial_lr_and_search_nothing(lr):
    """All-zero weights (a zero-initialised probe): the ramp keeps the user's lr, and the default's search does
    not double it (without that it doubles it many times on this logistic regression)."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randint(0, 2, (64,)).float()
    model = torch.nn.Linear(10, 1)
    torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
    opt = hh.HyperAdam(model.parameters(), lr=lr)
    for _ in range(6):
        F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y).backward()
        opt.step()
        opt.zero_grad()
        assert opt._tower_state.ramp.factor.item() == 1.0
    assert opt._tower_state.ramp.search.item() == 0 and not opt._tower_state.ramp.searching


def test_without_search_the_ramp_is_unchanged():
    ramp = _sized(0.5, 0.5, search=False)
    assert ramp.search is None
    assert [advance_ramp(ramp, torch.device("cpu")).item() for _ in range(2)] == [False, False]
    assert ramp.factor.item() == 0.5


@pytest.mark.parametrize(("lr", "c", "cap"), [(0.05, 0.01, 12), (1e-6, 0.01, 12), (0.05, 0.01, 3), (0.05, 0.9, 12)])
def test_search_against_a_written_out_reference(lr, c, cap, float64, make_mlp, batches, monkeypatch):
    """SGD weights, log(lr) learned by SGD(kappa): the probe, the approach, the search judged on the
    cosine of g_{t+1} and u_t = dw/dlog(lr) of the step just taken, and the level above only once it is over."""
    monkeypatch.setattr(ramp_module, "RAMP_SEARCH_DOUBLINGS", cap)
    kappa, tau = 0.5, 1e-3
    model, plain = make_mlp(), make_mlp()
    opt = hh.tower(model.parameters(), f"sgd(lr={lr})/sgd(lr={kappa},ramp={tau},ramp_search={c})")
    ref = torch.optim.SGD(plain.parameters(), lr=lr * 1e-6)
    previous, factor, target, log_lr, active, search = None, 1e-6, None, math.log(lr), True, -1
    grew, stopped, learned = 0, None, 0
    for x, y in batches(40):
        F.mse_loss(model(x), y).backward()
        F.mse_loss(plain(x), y).backward()
        g = grads(plain)
        if previous is not None:
            h = dot(g, previous)  # dL/dlog(lr) at the step just taken
            more = h < -c * math.sqrt(dot(g, g) * dot(previous, previous))
            held = active
            if search > 0:
                if more and search > 1:
                    factor, search, grew, held = 2 * factor, search - 1, grew + 1, True
                else:  # at half the largest factor accepted: this one at the cap, the one before else
                    held = held or factor > target  # held as it backs off, not when it ends at the target
                    factor = max(factor / (2 if more else 4), target)
                    search, stopped = 0, ("cap" if more else "disagreed")
            if active:
                factor = min(target, 2 * factor)
                active = factor < target
            if search < 0 and not active:
                search = cap + 1
            if not held:
                log_lr, learned = log_lr - kappa * h, learned + 1
        probe = previous is None
        previous, factor, target = step_both(opt, model, ref, plain, log_lr, factor, target, tau)
        if probe:
            active = factor < target
    assert stopped is not None and learned >= 5
    if c < 0.1:  # both ways to end are exercised, after some doublings
        assert stopped == ("cap" if cap == 3 else "disagreed") and grew >= 2 and factor > target
    else:  # a stricter cosine: the criterion is the reference's, whatever it decided
        assert stopped == "disagreed"


def _train(opt, model, data):
    for x, y in data:
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


SPEC = "adam(lr=1e-4)/adam(lr=0.05,ramp=0.001,normalize=true,ramp_search=0.01)"


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


@pytest.mark.parametrize(
    "entry",
    [torch.tensor([0.5]), torch.tensor([100]), torch.tensor([-7]), torch.tensor([True]), None],
    ids=["float", "past the cap", "below -1", "bool", "missing"],
)
def test_a_damaged_search_entry_is_refused(entry, make_mlp, batches):
    """Where the search stands is one integer in [-1, 13]; anything else (or none: only a tower with the
    same spec loads, and it saves one) would lift the cap or restart a finished search."""
    model = make_mlp()
    opt = hh.tower(model.parameters(), SPEC)
    _train(opt, model, batches(5))
    sd = opt.state_dict()
    tower = sd["param_groups"][0]["hyper_tower"]
    if entry is None:
        del tower["state.ramp_search"]
    else:
        tower["state.ramp_search"] = entry
    with pytest.raises(ValueError, match="ramp_search"):
        opt.load_state_dict(sd)


def test_a_step_that_raises_mid_search_leaves_the_search_as_it_was(make_mlp, batches, monkeypatch):
    model = make_mlp()
    opt = hh.tower(model.parameters(), SPEC)
    data = batches(6)
    _train(opt, model, data[:5])
    ramp = opt._tower_state.ramp
    assert ramp.searching
    before = (ramp.factor.clone(), ramp.search.clone(), opt.hyperparameters())
    F.mse_loss(model(data[5][0]), data[5][1]).backward()

    def fail(opt, ts):
        raise RuntimeError("simulated")

    monkeypatch.setattr(engine, "step_weights", fail)
    # The failed step is the one that would end the search: its host flag must come back too.
    monkeypatch.setattr(hypergradients, "asks_for_more", lambda *args: torch.zeros(1, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step()
    assert torch.equal(ramp.factor, before[0]) and torch.equal(ramp.search, before[1]) and ramp.searching
    assert opt.hyperparameters() == before[2]


def test_the_spec_round_trips_and_bad_values_are_refused():
    (level,) = parse_spec("adam(lr=0.05,ramp=0.001,normalize=true,ramp_search=0.3)")
    assert level.ramp_search == 0.3
    assert parse_spec(level.to_spec()) == [level]
    w = [torch.zeros(2, requires_grad=True)]
    assert hh.HyperAdam(w, hyper="adam(lr=0.05,ramp=0.001,ramp_search=0.3)").spec == (
        "adam/adam(lr=0.05,ramp=0.001,ramp_search=0.3)"
    )
    for spec, message in [
        ("adam(ramp=0.001,ramp_search=1.0)", r"outside \[0, 1\)"),
        ("adam(ramp=0.001,ramp_search=-0.1)", r"outside \[0, 1\)"),
        ("adam(ramp=0.001,ramp_search=nan)", r"outside \[0, 1\)"),
        ("adam(ramp_search=0.3)", "beside ramp= on level 1"),
        ("adam/adam(ramp_search=0.3)", "beside ramp= on level 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            hh.HyperAdam(w, hyper=spec)
    with pytest.raises(ValueError, match="compat='gdtuo' does not learn.*or ramp_search=0 on that level"):
        hh.tower(w, "adam/adam(ramp=0.001,ramp_search=0.3)", compat="gdtuo")


@pytest.mark.parametrize("lr", [1e-6, 0.05])
def test_a_search_that_ends_at_the_target_is_the_plain_ramp(lr, make_mlp, batches):
    """A cosine that the hypergradient never reaches: the search ends at once, and the run is the plain
    ramp's, step for step (no step held that the plain ramp would not hold)."""
    data = batches(20)
    runs = []
    for search in ("", ",ramp_search=0.999"):
        model = make_mlp()
        opt = hh.tower(model.parameters(), f"adam(lr={lr})/adam(lr=0.05,ramp=0.001,normalize=true{search})")
        trajectory = []
        for x, y in data:
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            trajectory.append(opt.hyperparameters())
        runs.append((trajectory, [p.detach().clone() for p in model.parameters()], opt))
    (plain, plain_w, _), (searched, searched_w, opt) = runs
    assert opt._tower_state.ramp.search.item() == 0 and not opt._tower_state.ramp.searching
    assert searched == plain
    assert all(torch.equal(a, b) for a, b in zip(plain_w, searched_w, strict=True))
