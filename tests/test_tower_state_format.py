"""The tower's state in a state dict: held once, in a form ``torch.distributed.checkpoint`` keeps, and
checkpoints written by hf_hyperopt 0.1.0 still load and resume exactly.

``tests/data/tower_state_0.1.0.pt`` was written by 0.1.0 (the tower entry in ``sd["tower"]`` and again,
with marker strings for empty containers, in the first param group): for each case the model and
optimizer after 3 steps, and the hyperparameters and weights 3 more steps give. Those were computed on
another CPU, whose matrix products round differently in the last bit (MKL picks its kernels by CPU), so
they are compared to rounding; exactness is checked on this machine, against the same state saved in
today's layout.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hf_hyperopt as hh
from hf_hyperopt.optim.distributed import TOWER_GROUP_KEY

OLD = Path(__file__).parent / "data" / "tower_state_0.1.0.pt"
CASES = ("adam/adam/sgd", "default", "sgd-tensor-trace")


def _mlp() -> nn.Module:
    torch.manual_seed(123)  # not the saved weights: everything must come from the checkpoint
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _resume(saved: dict, optimizer_sd: dict, batches: list) -> tuple[nn.Module, list]:
    model = _mlp()
    model.load_state_dict(saved["model"])
    opt = hh.tower(model.parameters(), saved["spec"], scope=saved["scope"])
    opt.load_state_dict(optimizer_sd)
    return model, _train(model, opt, batches)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("where", ["both", "tower only", "param group only"])
def test_a_0_1_0_checkpoint_resumes_exactly(case, where):
    old = torch.load(OLD, weights_only=True)
    saved = old["cases"][case]
    sd = saved["optimizer"]
    if where == "tower only":
        del sd["param_groups"][0][TOWER_GROUP_KEY]
    elif where == "param group only":  # what torch.distributed.checkpoint kept of it
        del sd["tower"]
    model = _mlp()
    model.load_state_dict(saved["model"])
    opt = hh.tower(model.parameters(), saved["spec"], scope=saved["scope"])
    opt.load_state_dict(sd)
    today = copy.deepcopy(opt.state_dict())  # the same state in today's layout
    trajectory = _train(model, opt, old["batches"][3:])
    again, again_trajectory = _resume(saved, today, old["batches"][3:])
    assert again_trajectory == trajectory
    for name, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    # Against what 0.1.0 computed: to rounding (another CPU; and SGD's momentum update has been one fused
    # pass since). A lost buffer or tangent moves the weights by about 7e-4.
    _assert_close_trajectories(trajectory, saved["trajectory"])
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved["final"][name], rtol=1e-6, atol=1e-7, msg=name)


def _assert_close_trajectories(got: list, expected: list) -> None:
    """Learned values step by step, to rounding: the same steps, levels and names."""

    def flat(trajectory):
        keys = [(i, k, n) for i, step in enumerate(trajectory) for k, level in enumerate(step) for n in level]
        values = [
            v
            for step in trajectory
            for level in step
            for x in level.values()
            for v in (x if isinstance(x, list) else [x])
        ]
        return keys, torch.tensor(values, dtype=torch.float64)

    (got_keys, got_values), (keys, values) = flat(got), flat(expected)
    assert got_keys == keys
    torch.testing.assert_close(got_values, values, rtol=1e-6, atol=0.0)


def _train(model, opt, batches) -> list:
    trajectory = []
    for x, y in batches:
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        trajectory.append(opt.hyperparameters())
    return trajectory


@pytest.mark.parametrize("case", CASES)
def test_a_0_1_0_dcp_checkpoint_loads_into_a_new_template(case, tmp_path):
    """torch.distributed.checkpoint fills the template of a fresh optimizer by flattened key; the flat
    entry's keys are the paths of 0.1.0's nested one, so a DCP checkpoint 0.1.0 wrote still loads."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    old = torch.load(OLD, weights_only=True)
    saved = old["cases"][case]
    model = _mlp()
    model.load_state_dict(saved["model"])
    opt = hh.tower(model.parameters(), saved["spec"], scope=saved["scope"])
    opt.load_state_dict(saved["optimizer"])
    sd = get_optimizer_state_dict(model, opt)
    sd["param_groups"][0][TOWER_GROUP_KEY] = saved["optimizer"]["param_groups"][0][TOWER_GROUP_KEY]  # as 0.1.0 saved it
    dcp.save({"optim": sd}, checkpoint_id=tmp_path)

    model2 = _mlp()
    model2.load_state_dict(saved["model"])
    opt2 = hh.tower(model2.parameters(), saved["spec"], scope=saved["scope"])
    template = {"optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(template, checkpoint_id=tmp_path)
    set_optimizer_state_dict(model2, opt2, template["optim"])
    _, resumed = _resume(saved, saved["optimizer"], old["batches"][3:])
    trajectory = _train(model2, opt2, old["batches"][3:])
    assert trajectory == resumed
    _assert_close_trajectories(trajectory, saved["trajectory"])


def test_the_tower_is_held_once_without_empty_containers(make_mlp, batches):
    """One flat entry in the first param group: strings, tensors and the step counts, nothing empty."""
    model = make_mlp()
    opt = hh.tower(model.parameters(), "adam(lr=0.01)/adam(lr=0.01)/sgd(lr=0.001)")
    assert opt.state_dict()["param_groups"][0][TOWER_GROUP_KEY] == {
        "spec": "adam(lr=0.01)/adam(lr=0.01)/sgd(lr=0.001)",
        "scope": "shared",
        "mode": "default",
    }
    _train(model, opt, batches(2))
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    entry = sd["param_groups"][0][TOWER_GROUP_KEY]
    assert set(entry) == {
        "spec",
        "scope",
        "mode",
        "state.theta.0",
        "state.theta.1",
        "state.upper_state.0.exp_avg",
        "state.upper_state.0.exp_avg_sq",
        "state.upper_tangent.0.lr",  # the top level (plain SGD, no state) learns nothing
        "state.step",
        "state.skipped",
    }
    assert entry["state.step"] == [[2] * 4, 2, 2]
    assert not any(isinstance(v, (list, dict)) and not v for v in entry.values())
    assert all(k not in entry for k in ("state", "learn"))


def test_a_0_1_0_entry_that_is_damaged_says_so():
    old = torch.load(OLD, weights_only=True)
    saved = old["cases"]["adam/adam/sgd"]
    sd = saved["optimizer"]
    sd["tower"]["state"] = "garbage"
    opt = hh.tower(_mlp().parameters(), saved["spec"])
    with pytest.raises(ValueError, match="layout of hf_hyperopt 0.1.0"):
        opt.load_state_dict(sd)
