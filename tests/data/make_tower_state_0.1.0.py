"""Write tests/data/tower_state_0.1.0.pt with hf_hyperopt 0.1.0 (commit c844997) on the path.

For each case: the model and a copy of the optimizer state dict after 3 steps, and the hyperparameters and
weights that 3 more steps give. Run as ``PYTHONPATH=<0.1.0 checkout> python tests/data/make_tower_state_0.1.0.py OUT``.
"""

import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn

import hf_hyperopt as hh

CASES = {
    "adam/adam/sgd": ("adam(lr=0.01)/adam(lr=0.01)/sgd(lr=0.001)", "shared"),
    "default": ("adam(lr=0.01)/adam(lr=0.05,ramp=0.001,normalize=true)", "shared"),
    "sgd-tensor-trace": ("sgd(lr=0.05,momentum=0.9,learn=lr+momentum)/adam(lr=0.01,trace=0.9)", "tensor"),
}


def data(n):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        out.append((x, torch.tanh(x @ w) + 0.1 * torch.randn(16, 3, generator=g)))
    return out


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


batches = data(6)
out = {"batches": batches, "cases": {}}
for name, (spec, scope) in CASES.items():
    model = mlp()
    opt = hh.tower(model.parameters(), spec, scope=scope)
    for x, y in batches[:3]:
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    saved = {
        "spec": spec,
        "scope": scope,
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(opt.state_dict()),
    }
    traj = []
    for x, y in batches[3:]:
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        traj.append(opt.hyperparameters())
    saved["trajectory"] = traj
    saved["final"] = {k: v.clone() for k, v in model.state_dict().items()}
    out["cases"][name] = saved
torch.save(out, sys.argv[1])
