"""Checkpoints: a run stopped, saved, reloaded into fresh objects and continued is bit-identical.

float32 on the CPU, as a Trainer checkpoint would be: ``state_dict`` -> ``torch.save`` ->
``torch.load(weights_only=True)`` -> a new model and a new optimizer -> ``load_state_dict``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import hf_hyperopt as hh
from hf_hyperopt.optim.distributed import TOWER_GROUP_KEY

STEPS, STOP = 12, 5


def _groups(model) -> list[dict]:
    return [
        {"params": [p for n, p in model.named_parameters() if not n.endswith("bias")], "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "weight_decay": 0.0},
    ]


CASES = {
    "adam/sgd": (lambda m: hh.tower(m.parameters(), "adam(lr=0.01)/sgd(lr=0.001)"), None),
    "adam/adam/sgd": (lambda m: hh.tower(m.parameters(), "adam(lr=0.01)/adam(lr=0.01)/sgd(lr=0.001)"), None),
    "group": (lambda m: hh.HyperAdamW(_groups(m), lr=0.01, scope="group"), None),
    "learn-lr+beta1": (
        lambda m: hh.HyperAdam(m.parameters(), lr=0.01, learn="lr+beta1", hyper=hh.HyperAdam(lr=0.01)),
        None,
    ),
    "sgd-momentum-tensor": (
        lambda m: hh.tower(m.parameters(), "sgd(lr=0.05,momentum=0.9)/adam(lr=0.01)", scope="tensor"),
        None,
    ),
    "timescale": (
        lambda m: hh.tower(m.parameters(), "adam(lr=0.01)/adam(lr=0.01,timescale=2)/sgd(lr=0.001,timescale=3)"),
        None,
    ),
    "default": (lambda m: hh.HyperAdam(m.parameters(), lr=0.01), None),
    "gdtuo-rmsprop": (lambda m: hh.tower(m.parameters(), "rmsprop(lr=0.01)/sgd(lr=0.001)", compat="gdtuo"), None),
}


def _run(model, opt, data, trajectory: list) -> None:
    for x, y in data:
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        trajectory.append(opt.hyperparameters())


@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_bit_exact(case, tmp_path, make_mlp, batches):
    build, _ = CASES[case]
    data = batches(STEPS)

    model = make_mlp()
    opt = build(model)
    uninterrupted: list = []
    _run(model, opt, data, uninterrupted)

    first = make_mlp()
    opt1 = build(first)
    resumed: list = []
    _run(first, opt1, data[:STOP], resumed)
    torch.save({"model": first.state_dict(), "optimizer": opt1.state_dict()}, tmp_path / "ckpt.pt")
    del first, opt1

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    second = make_mlp(seed=123)  # different init: everything must come from the checkpoint
    second.load_state_dict(ckpt["model"])
    opt2 = build(second)
    opt2.load_state_dict(ckpt["optimizer"])
    _run(second, opt2, data[STOP:], resumed)

    assert resumed == uninterrupted  # every level, every step, exact floats
    for p, q in zip(model.parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q)
    # Resuming with the tower state dropped would still train; make sure the comparison could fail.
    assert uninterrupted[-1][0] != uninterrupted[0][0]


def test_resume_continues_momentum_of_upper_levels(tmp_path, make_mlp, batches):
    """Upper-level state (Adam moments over the hyperparameters) is saved, not re-initialised."""
    data = batches(STEPS)
    model = make_mlp()
    opt = hh.tower(model.parameters(), "adam(lr=0.01)/adam(lr=0.01)")
    _run(model, opt, data[:STOP], [])
    sd = opt.state_dict()
    tower = sd["param_groups"][0][TOWER_GROUP_KEY]
    assert {k for k in tower if k.startswith("state.upper_state.")} == {
        "state.upper_state.0.exp_avg",
        "state.upper_state.0.exp_avg_sq",
    }
    exp_avg = tower["state.upper_state.0.exp_avg"]
    assert exp_avg.abs().sum() > 0
    torch.save(sd, tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    fresh = hh.tower(make_mlp().parameters(), "adam(lr=0.01)/adam(lr=0.01)")
    fresh.load_state_dict(loaded)
    assert fresh.hyperparameters() == opt.hyperparameters()
    assert torch.equal(fresh.state_dict()["param_groups"][0][TOWER_GROUP_KEY]["state.upper_state.0.exp_avg"], exp_avg)


def test_checkpoint_with_one_step_count_loads_and_resumes(tmp_path, make_mlp, batches):
    """A checkpoint written before the weight level counted steps per tensor (one count for the tower).

    Each tensor with saved state takes the old count; one without state (no gradient yet) takes 0, as in
    ``torch.optim``. Here every tensor but ``extra`` had a gradient at every step, so the converted counts
    are the true ones and the resumed run is the run that never stopped.
    """
    data = batches(STEPS)

    def build(model, extra):
        return hh.tower([*model.parameters(), extra], "adam(lr=0.01)/adam(lr=0.01)")

    def run(model, extra, opt, part, first):
        for t, (x, y) in enumerate(part, start=first):
            out = model(x)
            F.mse_loss(out + extra if t >= STOP else out, y).backward()  # `extra` joins after the checkpoint
            opt.step()
            opt.zero_grad()

    model, extra = make_mlp(), torch.nn.Parameter(torch.zeros(3))
    opt = build(model, extra)
    run(model, extra, opt, data, 0)

    first, extra1 = make_mlp(), torch.nn.Parameter(torch.zeros(3))
    opt1 = build(first, extra1)
    run(first, extra1, opt1, data[:STOP], 0)
    sd = copy.deepcopy(opt1.state_dict())
    steps = sd["param_groups"][0][TOWER_GROUP_KEY]["state.step"]
    assert steps == [[STOP] * 4 + [0], STOP]
    steps[0] = STOP  # the old layout: every level counted every step
    torch.save({"model": first.state_dict(), "extra": extra1.detach(), "optimizer": sd}, tmp_path / "old.pt")

    ckpt = torch.load(tmp_path / "old.pt", weights_only=True)
    second, extra2 = make_mlp(seed=123), torch.nn.Parameter(torch.zeros(3))
    second.load_state_dict(ckpt["model"])
    extra2.data.copy_(ckpt["extra"])
    opt2 = build(second, extra2)
    opt2.load_state_dict(ckpt["optimizer"])
    assert (opt2._tower_state.weight_steps, opt2._tower_state.level_steps) == ([STOP] * 4 + [0], [STOP])
    run(second, extra2, opt2, data[STOP:], STOP)
    assert opt2.hyperparameters() == opt.hyperparameters()
    for p, q in zip([*model.parameters(), extra], [*second.parameters(), extra2], strict=True):
        assert torch.equal(p, q)
    assert opt2.state_dict()["param_groups"][0][TOWER_GROUP_KEY]["state.step"] == [[STEPS] * 4 + [STEPS - STOP], STEPS]
