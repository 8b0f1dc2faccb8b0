"""``torch.compile`` of a training step that calls ``opt.step()`` on a tower.

The tower's step runs eagerly behind one graph break (``TowerOptimizer.step`` is excluded from
compilation), so a compiled training step must give the eager run's numbers, with the eager and
the inductor backends, and a step that raises inside a compiled function must leave the optimizer as
:mod:`hf_hyperopt.optim.rollback` says an eager one does.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from state_compare import same_state

import hf_hyperopt as hh
from hf_hyperopt.optim import engine

STEPS = 5


def _training_step(model, opt):
    def step(x, y):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    return step


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_training_step_matches_eager(backend, make_mlp, batches):
    """The default HyperAdam tower on a tiny MLP: compiled and eager agree over every step."""
    data = batches(STEPS)
    runs = []
    for compiled in (False, True):
        model = make_mlp()
        opt = hh.HyperAdam(model.parameters(), lr=0.01)
        step = _training_step(model, opt)
        if compiled:
            step = torch.compile(step, backend=backend)
        losses = torch.stack([step(x, y) for x, y in data])
        runs.append((model, opt, losses))
    (model, opt, losses), (cmodel, copt, closses) = runs
    torch.testing.assert_close(closses, losses, rtol=1e-6, atol=1e-6)
    for p, q in zip(cmodel.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert copt.hyperparameters()[0]["lr"] == pytest.approx(opt.hyperparameters()[0]["lr"], rel=1e-6)
    assert (copt._tower_state.weight_steps, copt._tower_state.level_steps) == ([STEPS] * 4, [STEPS])
    # The tower did learn, so the agreement is not two runs that left the lr alone.
    assert copt.hyperparameters()[0]["lr"] != pytest.approx(0.01, rel=1e-3)


def test_a_step_that_raises_inside_a_compiled_function_changes_nothing(make_mlp, batches, monkeypatch):
    data = batches(4)
    model = make_mlp()
    opt = hh.HyperAdam(model.parameters(), lr=0.01)
    step = torch.compile(_training_step(model, opt), backend="eager")
    for x, y in data[:2]:
        step(x, y)
    before, weights = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()]

    def fail(opt, ts):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(engine, "step_weights", fail)  # the upper level has stepped by then
    with pytest.raises(RuntimeError, match="simulated"):
        step(*data[2])
    # As rollback.py states: all is as it was but the tangents, consumed by the hypergradient, which
    # are zeroed (the next hypergradient is then zero, as after a step that did not move the weights).
    for entry in before["state"].values():
        entry["hypertangent_lr"].zero_()
    assert same_state(opt.state_dict(), before)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))

    monkeypatch.undo()
    opt.zero_grad()
    for x, y in data[2:]:  # and the compiled function trains on
        step(x, y)
    assert (opt._tower_state.weight_steps, opt._tower_state.level_steps) == ([4] * 4, [4])
    assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
