"""Tangents a rule holds in its state (``Rule.held_tangents``) against the same tangents written.

SGD with momentum and without Nesterov holds its step size's tangent (a multiple of the momentum buffer)
and its momentum's (a multiple of the buffer before the step, kept where the new buffer would have been
written): no tangent buffer, no copy. Held or written, the tower must take the same steps, load the same
checkpoints (including ones saved with written tangents) and recover the same way from a step that raises.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import hf_hyperopt as hh
from hf_hyperopt.levels.sgd import SGDRule
from hf_hyperopt.optim import tangents

HELD = [
    ("sgd(lr=0.05,momentum=0.9,learn=lr+momentum)/adam(lr=0.02)", "shared"),
    ("sgd(lr=0.05,momentum=0.9)/adam(lr=0.05,ramp=0.001,normalize=true)", "shared"),
    ("sgd(lr=0.05,momentum=0.9,weight_decay=0.01,learn=lr+momentum+weight_decay)/adam(lr=0.02)", "tensor"),
    ("sgd(lr=0.05,momentum=0.8,learn=momentum)/adam(lr=0.02,normalize=true)", "group"),
    ("sgd(lr=0.05,momentum=0.9,learn=lr+momentum)/adam(lr=0.02)/sgd(lr=1e-3)", "shared"),
    ("sgd(lr=1e-4,momentum=0.9)/adam(lr=0.05,ramp=0.001,normalize=true,ramp_search=0.3)", "shared"),
]


def _written(monkeypatch) -> None:
    monkeypatch.setattr(SGDRule, "held_tangents", lambda self, learn: {})


def _tower(model, spec: str, scope: str):
    return hh.tower(
        [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}], spec, scope=scope
    )


def _train(spec: str, scope: str, make_mlp, batches, steps: int = 8, opt=None, model=None, start: int = 0):
    if model is None:
        model = make_mlp()
    if opt is None:
        opt = _tower(model, spec, scope)
    for i, (x, y) in enumerate(batches(start + steps)[start:]):
        F.mse_loss(model(x), y).backward()
        if (start + i) % 3 == 1:
            model[2].bias.grad = None  # a tensor that skips a step: its held tangent reads zero next time
        opt.step()
        opt.zero_grad()
    return model, opt


def _resumed(spec: str, scope: str, saved: dict, saved_model: dict, make_mlp, batches):
    """A fresh model and tower loaded from step 5's state dicts, trained four more steps."""
    model = make_mlp()
    model.load_state_dict(saved_model)
    opt = _tower(model, spec, scope)
    opt.load_state_dict(saved)
    _train(spec, scope, make_mlp, batches, steps=4, opt=opt, model=model, start=5)
    return model, opt


def _flat(hyper: list[dict]) -> list[float]:
    return [x for level in hyper for v in level.values() for x in (v if isinstance(v, list) else [v])]


@pytest.mark.parametrize("spec, scope", HELD)
def test_held_tangents_take_the_steps_written_ones_take(spec, scope, float64, make_mlp, batches, monkeypatch):
    held_model, held = _train(spec, scope, make_mlp, batches)
    assert held._held
    assert not {"hypertangent_" + n for n in held._held} & {k for s in held.state.values() for k in s}
    with monkeypatch.context() as m:
        _written(m)
        written_model, written = _train(spec, scope, make_mlp, batches)
        assert not written._held
    for a, b in zip(held_model.parameters(), written_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert _flat(held.hyperparameters()) == pytest.approx(_flat(written.hyperparameters()), rel=1e-9)
    assert _flat(held.hyperparameters()) != pytest.approx(
        _flat(hh.tower(held_model.parameters(), spec).hyperparameters(given=True)), rel=1e-6
    )


@pytest.mark.parametrize("spec, scope", HELD[:3])
def test_a_checkpoint_with_written_tangents_loads_into_held_ones(spec, scope, float64, make_mlp, batches, monkeypatch):
    """A state dict saved with every tangent written (hf_hyperopt 0.1.0, or a tower with Nesterov) carries
    buffers for the held names: they become the held ones, and training goes on as it would have."""
    with monkeypatch.context() as m:
        _written(m)
        model, opt = _train(spec, scope, make_mlp, batches, steps=5)
        saved = copy.deepcopy(opt.state_dict())
        saved_model = copy.deepcopy(model.state_dict())
        assert any(k.startswith("hypertangent_") for s in saved["state"].values() for k in s)
        _train(spec, scope, make_mlp, batches, steps=4, opt=opt, model=model, start=5)
    resumed_model, resumed = _resumed(spec, scope, saved, saved_model, make_mlp, batches)
    assert resumed._held
    for s in resumed.state.values():
        assert not {"hypertangent_" + n for n in resumed._held} & set(s)
    for a, b in zip(resumed_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert _flat(resumed.hyperparameters()) == pytest.approx(_flat(opt.hyperparameters()), rel=1e-9)


def test_a_held_checkpoint_resumes_exactly(make_mlp, batches):
    spec, scope = HELD[0]
    model, opt = _train(spec, scope, make_mlp, batches, steps=5)
    saved, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    assert {"momentum_previous", "hyperscale_lr", "hyperscale_momentum"} <= set(saved["state"][0])
    _train(spec, scope, make_mlp, batches, steps=4, opt=opt, model=model, start=5)
    resumed_model, resumed = _resumed(spec, scope, saved, saved_model, make_mlp, batches)
    assert all(torch.equal(a, b) for a, b in zip(resumed_model.parameters(), model.parameters(), strict=True))
    assert resumed.hyperparameters() == opt.hyperparameters()


def _set(key: str, value):
    def damage(state: dict) -> None:
        state[key] = value

    return damage


@pytest.mark.parametrize(
    "damage, message",
    [
        (_set("hyperscale_momentum", torch.tensor(float("nan"))), "'hyperscale_momentum' of parameter 0"),
        (_set("hyperscale_momentum", torch.ones(3)), "not one number"),
        (lambda state: state.pop("momentum_previous"), "has 'hyperscale_momentum' but no 'momentum_previous'"),
    ],
    ids=["nan", "not one number", "without its buffer"],
)
def test_a_damaged_held_constant_is_refused(damage, message, make_mlp, batches):
    spec, scope = HELD[0]
    _, opt = _train(spec, scope, make_mlp, batches, steps=3)
    bad = copy.deepcopy(opt.state_dict())
    damage(bad["state"][0])
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)


def test_a_step_that_raises_inside_the_update_keeps_the_momentum_and_clears_the_held_tangents(
    make_mlp, batches, monkeypatch
):
    spec, scope = HELD[0]
    model, opt = _train(spec, scope, make_mlp, batches, steps=4)
    x, y = batches(5)[-1]
    F.mse_loss(model(x), y).backward()
    hyper = opt.hyperparameters()
    weights = [p.clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(tangents, "_apply_written", fail)  # after the rule wrote its new buffers
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step()
    monkeypatch.undo()
    assert opt.hyperparameters() == hyper
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    # The new buffer went where the older one was, and the step did not take it.
    assert all(
        torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), buffers, strict=True)
    )
    assert all(float(s) == 0.0 for b in opt._buckets for v in b.scales.values() for s in v)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(_flat(opt.hyperparameters()))))


@pytest.mark.parametrize("zero_from", [0, 3], ids=["from the start", "from step 3"])
def test_a_held_lr_learns_when_every_group_has_no_momentum(zero_from, float64, make_mlp, batches, monkeypatch):
    """With every group's momentum 0 the rule skips the buffer's update, but the held lr's tangent is read
    from the buffer: it must then be the direction itself (it was the stale or zero buffer)."""

    def run():
        model = make_mlp()
        groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
        if zero_from == 0:
            for g in groups:
                g["momentum"] = 0.0
        opt = hh.tower(groups, "sgd(lr=0.05,momentum=0.9)/adam(lr=0.02)")
        for i, (x, y) in enumerate(batches(8)):
            if i == zero_from:
                for g in opt.param_groups:
                    g["momentum"] = 0.0
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        return opt.hyperparameters()[0]["lr"]

    held = run()
    with monkeypatch.context() as m:
        _written(m)
        written = run()
    assert held == pytest.approx(written, rel=1e-9) and held != pytest.approx(0.05, rel=1e-3)


def test_a_bfloat16_run_resumes_exactly_with_its_held_constants_in_float32(make_mlp, batches):
    """torch.optim casts a loaded state entry to its parameter's dtype; a held tangent's constant keeps
    the tower's float32 (bfloat16 would round it, and the resumed run would drift off)."""
    spec, scope = HELD[0]
    data = [(x.bfloat16(), y.bfloat16()) for x, y in batches(9)]

    def lowp(n=9):
        return data[:n]

    def model_bf16():
        return make_mlp().bfloat16()

    model, opt = _train(spec, scope, model_bf16, lambda n: lowp(n), steps=5)
    saved, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    _train(spec, scope, model_bf16, lambda n: lowp(n), steps=4, opt=opt, model=model, start=5)
    resumed_model, resumed = _resumed(spec, scope, saved, saved_model, model_bf16, lambda n: lowp(n))
    assert all(
        v.dtype == torch.float32 for s in resumed.state.values() for k, v in s.items() if k.startswith("hyperscale_")
    )
    assert all(torch.equal(a, b) for a, b in zip(resumed_model.parameters(), model.parameters(), strict=True))
    assert resumed.hyperparameters() == opt.hyperparameters()
