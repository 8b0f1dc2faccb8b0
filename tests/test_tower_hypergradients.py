"""The hypergradients themselves, against the paper's closed forms and against finite differences,
and the memory contract: one tangent buffer per learned weight-level hyperparameter."""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call

import hf_hyperopt as hh
from hf_hyperopt.levels import AdamRule
from hf_hyperopt.levels.base import Hyper


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b, strict=True)))


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("compat", [None, "gdtuo"])
def test_sgd_lr_hypergradient_is_minus_gradient_dot_previous_gradient(compat, float64, make_mlp, batches):
    """SGD/SGD(kappa): dL_t/dlr = -<g_t, g_{t-1}> (Baydin et al.; the paper's section 2), so the
    learned lr moves by +kappa <g_t, g_{t-1}>; in the default mode lr is learned as log(lr), whose
    hypergradient carries the chain-rule factor lr."""
    kappa = 0.01
    model = make_mlp()
    opt = hh.tower(model.parameters(), f"sgd(lr=0.05)/sgd(lr={kappa})", compat=compat)
    previous, lr = None, 0.05
    for x, y in batches(15):
        F.mse_loss(model(x), y).backward()
        g = _grads(model)
        opt.step()
        opt.zero_grad()
        new_lr = opt.hyperparameters()[0]["lr"]
        h = 0.0 if previous is None else -_dot(g, previous)
        if compat == "gdtuo":
            assert new_lr - lr == pytest.approx(-kappa * h, rel=1e-9, abs=1e-15)
        else:
            assert math.log(new_lr) - math.log(lr) == pytest.approx(-kappa * lr * h, rel=1e-9, abs=1e-15)
        previous, lr = g, new_lr
    assert lr != pytest.approx(0.05, rel=1e-3)


@pytest.mark.parametrize("timescales", [(0, 0), (3, 5)])
def test_sgd_tower_of_three_chains_hypergradients(float64, make_mlp, batches, timescales):
    """sgd(lr)/sgd(kappa)/sgd(lam) in gdtuo mode: lr_t = lr_{t-1} - kappa_t c1_t h_t with h_t = -<g_t, g_{t-1}>,
    so dL_{t+1}/dkappa_t = h_{t+1} * (-c1_t h_t) and kappa_{t+1} = kappa_t + lam c2_{t+1} c1_t h_{t+1} h_t,
    where ``c_t = min(1, sqrt(timescale / t))`` is a level's step-size factor at its t-th step (1 without a
    timescale): a learned step size's factor is in its tangent."""
    lam = 1e-3
    model = make_mlp()
    t1, t2 = timescales
    spec = f"sgd(lr=0.05)/sgd(lr=0.01,timescale={t1})/sgd(lr={lam},timescale={t2})"
    opt = hh.tower(model.parameters(), spec, compat="gdtuo")

    def factor(timescale: int, t: int) -> float:
        return min(1.0, math.sqrt(timescale / t)) if timescale else 1.0

    g_prev, h_prev, kappa, lr = None, 0.0, 0.01, 0.05
    for t, (x, y) in enumerate(batches(12), start=1):
        F.mse_loss(model(x), y).backward()
        g = _grads(model)
        opt.step()
        opt.zero_grad()
        h = 0.0 if g_prev is None else -_dot(g, g_prev)
        new_lr, new_kappa = (level["lr"] for level in opt.hyperparameters()[:2])
        expected = lam * factor(t2, t) * factor(t1, t - 1) * h * h_prev if t > 1 else 0.0
        assert new_kappa - kappa == pytest.approx(expected, rel=1e-9, abs=1e-18)
        assert new_lr - lr == pytest.approx(-new_kappa * factor(t1, t) * h, rel=1e-9, abs=1e-18)
        g_prev, h_prev, kappa, lr = g, h, new_kappa, new_lr
    assert kappa != 0.01


def _adam_step(params, grads, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """One Adam step written out, as the slow reference for the finite difference."""
    out = []
    for p, g, m_, v_ in zip(params, grads, m, v, strict=True):
        m2 = beta1 * m_ + (1 - beta1) * g
        v2 = beta2 * v_ + (1 - beta2) * g * g
        out.append(p - lr / (1 - beta1**step) * m2 / ((v2 / (1 - beta2**step)).sqrt() + eps))
    return out


def _loss_after(model, names, step, lr, batch) -> float:
    """The loss on ``batch`` after one Adam step (from the snapshot ``step``) with step size ``lr``."""
    w = _adam_step(*step, lr)
    x, y = batch
    return float(F.mse_loss(functional_call(model, dict(zip(names, w, strict=True)), (x,)), y))


def test_adam_log_lr_hypergradient_matches_finite_difference(float64, make_mlp, batches):
    """Default mode, Adam/SGD(kappa): the hypergradient used at step t+1 is dL_{t+1}(w_{t+1})/dlog(lr_t),
    the derivative of the next loss with respect to the log step size that step t used."""
    kappa = 0.01
    model = make_mlp()
    names = [n for n, _ in model.named_parameters()]
    opt = hh.tower(model.parameters(), f"adam(lr=0.01)/sgd(lr={kappa})")
    data = batches(9)
    expected: list[float] = []  # finite-difference hypergradient for the next step
    used: list[float] = []  # what the tower applied: log(lr) moves by -kappa * hypergradient
    for t, (x, y) in enumerate(data, start=1):
        F.mse_loss(model(x), y).backward()
        params = [p.detach().clone() for p in model.parameters()]
        grads = _grads(model)
        state = [opt.state[p] for p in model.parameters()]
        m = [
            s["exp_avg"].clone() if "exp_avg" in s else torch.zeros_like(p) for s, p in zip(state, params, strict=True)
        ]
        v = [
            s["exp_avg_sq"].clone() if "exp_avg_sq" in s else torch.zeros_like(p)
            for s, p in zip(state, params, strict=True)
        ]
        log_lr_before = math.log(opt.hyperparameters()[0]["lr"])
        opt.step()
        opt.zero_grad()
        # The tower steps top-down: step t's weights move with the lr its upper level just set.
        log_lr = math.log(opt.hyperparameters()[0]["lr"])
        if t > 1:
            used.append(-(log_lr - log_lr_before) / kappa)
        if t == len(data):
            break
        for p, w in zip(model.parameters(), _adam_step(params, grads, m, v, t, math.exp(log_lr)), strict=True):
            torch.testing.assert_close(p.detach(), w)  # the slow reference is the step the tower took
        step = (params, grads, m, v, t)
        delta = 1e-5
        plus = _loss_after(model, names, step, math.exp(log_lr + delta), data[t])
        minus = _loss_after(model, names, step, math.exp(log_lr - delta), data[t])
        expected.append((plus - minus) / (2 * delta))
    assert used == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert sum(abs(h) > 1e-4 for h in expected) >= 5  # the derivative is not trivially zero


ONE_STEP = "adam(lr=0.05,ramp=0.001,normalize=true)"  # a level above without a trace


@pytest.mark.parametrize(
    "build, names, held",
    [
        (lambda p: hh.HyperAdam(p, lr=0.01), {"lr"}, set()),
        (lambda p: hh.HyperAdam(p, lr=0.01, learn="lr+beta1+beta2"), {"lr", "beta1", "beta2"}, set()),
        # Without Nesterov SGD's tangents are multiples of its momentum buffers: held there, not written
        # (with a level above that learns from one step; the default's trace needs buffers).
        (
            lambda p: hh.HyperSGD(p, lr=0.01, momentum=0.9, learn="lr+momentum", hyper=ONE_STEP),
            set(),
            {"lr", "momentum"},
        ),
        (lambda p: hh.HyperSGD(p, lr=0.01, momentum=0.9, hyper=ONE_STEP), set(), {"lr"}),
        (lambda p: hh.HyperSGD(p, lr=0.01, momentum=0.9), {"lr"}, set()),
        (
            lambda p: hh.HyperSGD(p, lr=0.01, momentum=0.9, nesterov=True, learn="lr+momentum"),
            {"lr", "momentum"},
            set(),
        ),
        (lambda p: hh.tower(p, "sgd(lr=0.01,momentum=0.9)/adam(trace=0.9)"), {"lr"}, set()),  # a trace needs buffers
        (lambda p: hh.tower(p, "rmsprop/sgd/sgd"), {"lr"}, set()),
        (lambda p: hh.tower(p, "rmsprop/sgd", compat="gdtuo"), {"lr", "alpha"}, set()),
        (lambda p: hh.HyperAdam(p, lr=0.01, hyper=None), set(), set()),
        (lambda p: hh.tower(p, "adagrad(lr=0.1)/sgd", scope="tensor"), {"lr"}, set()),
    ],
)
def test_one_tangent_buffer_per_learned_weight_level_hyperparameter(build, names, held, make_mlp, batches):
    """A parameter-sized buffer per learned name at most: written tangents have one each; a held one has
    a number per tensor, and the momentum's the previous buffer (in place of its tangent buffer)."""
    model = make_mlp()
    opt = build(model.parameters())
    for x, y in batches(2):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    for p in model.parameters():
        tangents = {k for k in opt.state[p] if k.startswith("hypertangent_")}
        assert tangents == {"hypertangent_" + n for n in names}
        assert {k for k in opt.state[p] if k.startswith("hyperscale_")} == {"hyperscale_" + n for n in held}
        for k in tangents:
            assert opt.state[p][k].shape == p.shape and opt.state[p][k].dtype == p.dtype
        # Nothing else parameter-sized beyond the algorithm's own buffers.
        sized = {k for k, v in opt.state[p].items() if v.shape == p.shape} - tangents
        assert sized <= {"exp_avg", "exp_avg_sq", "momentum_buffer", "square_avg", "sum"} | (
            {"momentum_previous"} if "momentum" in held else set()
        )


def test_adam_rule_with_one_step_count_per_tensor_is_the_rule_run_per_tensor(float64):
    """The weight level hands the rule one step count per tensor when its tensors have taken different
    numbers of steps; the bias corrections, and the tangents in beta1 and beta2 that they feed, must then
    be those of each tensor stepped alone with its own count."""
    g = torch.Generator().manual_seed(0)
    params, grads, m = ([torch.randn(3, 2, generator=g) for _ in range(3)] for _ in range(3))
    v = [torch.rand(3, 2, generator=g) for _ in range(3)]
    counts = [1, 4, 7]

    def step(idx: list[int], count, learned: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = len(idx)
        values = {"lr": 0.01, "beta1": 0.8, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.0}
        with fwAD.dual_level():
            hp = {k: torch.full((n,), x) for k, x in values.items()}
            hp[learned] = fwAD.make_dual(hp[learned], torch.ones(n))
            p = [params[i] for i in idx]
            state = {"exp_avg": [m[i].clone() for i in idx], "exp_avg_sq": [v[i].clone() for i in idx]}
            work = {"direction": [torch.empty_like(t) for t in p]}
            out = AdamRule().update(
                p, [grads[i] for i in idx], state, work, Hyper(hp, frozenset({"weight_decay"})), count
            )
            new = [q + d * s for q, d, s in zip(p, out.direction, out.scale.unbind(0), strict=True)]
            return [(fwAD.unpack_dual(t).primal, fwAD.unpack_dual(t).tangent) for t in new]

    for learned in ("beta1", "beta2"):
        together = step([0, 1, 2], torch.tensor(counts, dtype=torch.float64), learned)
        alone = [step([i], c, learned)[0] for i, c in enumerate(counts)]
        for (w, dw), (w1, dw1) in zip(together, alone, strict=True):
            torch.testing.assert_close(w, w1, rtol=1e-14, atol=0)
            torch.testing.assert_close(dw, dw1, rtol=1e-12, atol=0)
        # One count for all would not do: the bias correction of step 1 is not that of step 7.
        assert not torch.allclose(step([2], 1, learned)[0][1], alone[2][1])


@pytest.mark.parametrize("compat", [None, "gdtuo"])
def test_a_learned_beta1_is_not_a_second_step_size(compat, float64):
    """On a linear loss (the same gradient every step) Adam's step is g / (|g| + eps) whatever beta1 is
    (m_t / (1 - beta1^t) = g), so with the history held constant beta1's hypergradient is 0 and it stays
    where it started. Differentiating all t factors of beta1^t, as the reference implementation does,
    reads the bias correction as a step size: beta1 then rises on every step that a larger one helps."""
    w = torch.nn.Parameter(torch.zeros(4, 3))
    c = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    opt = hh.tower([w], "adam(lr=0.01,learn=lr+beta1)/sgd(lr=1e-3)", compat=compat)
    for _ in range(30):
        opt.zero_grad()
        (c * w).sum().backward()
        opt.step()
    beta1 = opt.hyperparameters()[0]["beta1"]
    if compat is None:
        assert beta1 == pytest.approx(0.9, abs=1e-12)
    else:
        assert beta1 > 0.9 + 1e-4
