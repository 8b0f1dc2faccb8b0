"""``compat="gdtuo"`` against the paper's reference implementation, step by step.

The reference (PyPI ``gradient-descent-the-ultimate-optimizer``) drives the model through
``ModuleWrapper``, ``begin()`` and ``backward(create_graph=True)``; the tower runs an ordinary loop.
Both start from the same weights and see the same batches; every learned hyperparameter of every
level (natural units) and the final weights must agree to 1e-5 relative over 50 steps.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from gradient_descent_the_ultimate_optimizer import gdtuo

import hf_hyperopt as hh

STEPS = 50
RTOL = 1e-5


def _reference_level(name: str, values: dict[str, float], above: gdtuo.Optimizable) -> gdtuo.Optimizable:
    """The gdtuo optimizer for one level of a spec: SGD(alpha, mu), Adam(alpha, beta1, beta2), ..."""
    if name == "sgd":
        return gdtuo.SGD(alpha=values["lr"], mu=values["momentum"], optimizer=above)
    if name == "adam":
        return gdtuo.Adam(alpha=values["lr"], beta1=values["beta1"], beta2=values["beta2"], optimizer=above)
    if name == "adagrad":
        return gdtuo.AdaGrad(alpha=values["lr"], optimizer=above)
    if name == "rmsprop":
        return gdtuo.RMSProp(alpha=values["lr"], gamma=values["alpha"], optimizer=above)
    raise AssertionError(name)


def _reference_natural(opt: gdtuo.Optimizable) -> dict[str, float]:
    """A gdtuo level's hyperparameters in our names and natural units."""
    p = {k: v.detach() for k, v in opt.parameters.items()}

    def rate(x: torch.Tensor) -> float:  # gdtuo stores rates as atanh(2y - 1)
        return float((x.tanh() + 1.0) / 2.0)

    if isinstance(opt, gdtuo.SGD):
        return {"lr": float(p["alpha"]), "momentum": float(p["mu"])}
    if isinstance(opt, gdtuo.Adam):
        return {"lr": float(p["alpha"]), "beta1": rate(p["beta1"]), "beta2": rate(p["beta2"])}
    if isinstance(opt, gdtuo.AdaGrad):
        return {"lr": float(p["alpha"])}
    if isinstance(opt, gdtuo.RMSProp):
        return {"lr": float(p["alpha"]) ** 2, "alpha": rate(p["gamma"])}
    raise AssertionError(type(opt))


SPECS = [
    "sgd(lr=0.05)/sgd(lr=0.01)",
    "sgd(lr=0.05,momentum=0.5)/sgd(lr=0.01)",
    "sgd(lr=0.05)/sgd(lr=0.01)/sgd(lr=0.001)",
    "adam(lr=0.01)/sgd(lr=0.0001)",
    "adam(lr=0.01)/adam(lr=0.001)",
    "adam(lr=0.01)/adam(lr=0.001)/sgd(lr=0.0001)",
    "adagrad(lr=0.05)/sgd(lr=0.001)",
    "rmsprop(lr=0.01)/sgd(lr=0.001)",
    "rmsprop(lr=0.01)/rmsprop(lr=0.001)",
    # The remaining stacks of the paper's MNIST table: adaptive levels learning SGD's step size.
    "sgd(lr=0.05)/adam(lr=0.01)",
    "sgd(lr=0.05)/adagrad(lr=0.01)",
    "sgd(lr=0.05)/rmsprop(lr=0.01)",
    "adagrad(lr=0.05)/adagrad(lr=0.01)",
]


@pytest.mark.parametrize("spec", SPECS)
def test_matches_reference_implementation(spec, float64, make_mlp, batches):
    levels = hh.parse_spec(spec)
    reference_stack = gdtuo.NoOpOptimizer()
    for cfg in reversed(levels):
        reference_stack = _reference_level(cfg.rule.name, cfg.full_values(), reference_stack)
    ref_model, model = make_mlp(), make_mlp()
    wrapper = gdtuo.ModuleWrapper(ref_model, optimizer=reference_stack)
    wrapper.initialize()
    opt = hh.tower(model.parameters(), spec, compat="gdtuo")
    assert opt.learned()[: len(levels) - 1] == [tuple(_reference_natural_names(cfg)) for cfg in levels[:-1]], (
        "gdtuo mode learns what the reference learns"
    )

    start = opt.hyperparameters()
    for x, y in batches(STEPS):
        wrapper.begin()
        wrapper.zero_grad()
        ref_loss = F.mse_loss(wrapper.forward(x), y)
        with warnings.catch_warnings():  # the reference's create_graph reference-cycle warning
            warnings.simplefilter("ignore", UserWarning)
            ref_loss.backward(create_graph=True)
        wrapper.step()

        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

        torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=RTOL, atol=0)
        ours = opt.hyperparameters()
        level = reference_stack
        for k in range(len(levels) - 1):
            theirs = _reference_natural(level)
            for name in opt.learned()[k]:
                assert ours[k][name] == pytest.approx(theirs[name], rel=RTOL), (k, name)
                # Betas move by ~1e-5 of their value: compare the displacement too, so a wrong update
                # cannot hide inside the tolerance.
                moved, ref_moved = ours[k][name] - start[k][name], theirs[name] - start[k][name]
                assert moved == pytest.approx(ref_moved, rel=RTOL, abs=1e-12), (k, name)
            level = level.optimizer

    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=RTOL, atol=1e-12)
    # The comparison means something only if the learned step size actually moved.
    assert abs(opt.hyperparameters()[0]["lr"] / start[0]["lr"] - 1.0) > 1e-3


def _reference_natural_names(cfg) -> list[str]:
    """What the reference learns for a level, in our names (SGD's mu only when it starts non-zero)."""
    name, values = cfg.rule.name, cfg.full_values()
    if name == "sgd":
        return ["lr", "momentum"] if values["momentum"] != 0.0 else ["lr"]
    return {"adam": ["lr", "beta1", "beta2"], "adagrad": ["lr"], "rmsprop": ["lr", "alpha"]}[name]
