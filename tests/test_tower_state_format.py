"""The tower's state in a state dict: held once, in a form ``torch.distributed.checkpoint`` keeps, and
checkpoints written by hf_hyperopt 0.1.0 still load and resume exactly.

``tests/data/tower_state_0.1.0.pt`` was written by 0.1.0 (the tower entry in ``sd["tower"]`` and again,
with marker strings for empty containers, in the first param group): for each case the model and
optimizer after 3 steps, and the hyperparameters and weights 3 more steps give.
"""

from __future__ import annotations

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
    trajectory = []
    for x, y in batches:
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        trajectory.append(opt.hyperparameters())
    return model, trajectory


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
    model, trajectory = _resume(saved, sd, old["batches"][3:])
    assert trajectory == saved["trajectory"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved["final"][name]), name
