"""Checkpoints: a run stopped, saved, reloaded into fresh objects and continued is bit-identical.

float32 on the CPU, as a Trainer checkpoint would be: ``state_dict`` -> ``torch.save`` ->
``torch.load(weights_only=True)`` -> a new model and a new optimizer -> ``load_state_dict``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hf_hyperopt as hh

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
    upper = sd["tower"]["state"]["upper_state"][0]
    assert set(upper) == {"exp_avg", "exp_avg_sq"} and upper["exp_avg"].abs().sum() > 0
    torch.save(sd, tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    fresh = hh.tower(make_mlp().parameters(), "adam(lr=0.01)/adam(lr=0.01)")
    fresh.load_state_dict(loaded)
    assert fresh.hyperparameters() == opt.hyperparameters()
    assert torch.equal(fresh.state_dict()["tower"]["state"]["upper_state"][0]["exp_avg"], upper["exp_avg"])
