"""The tangents the built-in rules write, d(new params)/d(theta), against forward-mode AD through the
update (the path a rule without written tangents takes) and against central finite differences.

Every rule, every learnable hyperparameter alone and all at once, at non-zero state with per-tensor
step counts that differ, weight decay on and off, with and without a trace. Adding a rule or an
option is one line in ``CASES``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hf_hyperopt as hh
from hf_hyperopt.levels import AdaGradRule, AdamRule, AdamWRule, RMSPropRule, SGDRule
from hf_hyperopt.levels import adam as adam_level
from hf_hyperopt.levels.base import Hyper, Rule, to_natural, to_raw
from hf_hyperopt.optim import tangents

# id -> (rule class, rule options, hyperparameter values that differ from the defaults)
CASES: dict[str, tuple[type[Rule], dict[str, bool], dict[str, float]]] = {
    "sgd": (SGDRule, {}, {"lr": 0.1}),
    "sgd-wd": (SGDRule, {}, {"lr": 0.1, "weight_decay": 0.05}),
    "sgd-momentum": (SGDRule, {}, {"lr": 0.1, "momentum": 0.9}),
    "sgd-momentum-wd": (SGDRule, {}, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05}),
    "sgd-nesterov-wd": (SGDRule, {"nesterov": True}, {"lr": 0.1, "momentum": 0.8, "weight_decay": 0.05}),
    "adam": (AdamRule, {}, {"lr": 0.01, "beta1": 0.8, "beta2": 0.95, "eps": 1e-3}),
    "adam-wd": (AdamRule, {}, {"lr": 0.01, "beta1": 0.8, "beta2": 0.95, "eps": 1e-3, "weight_decay": 0.1}),
    "adamw": (AdamWRule, {}, {"lr": 0.01, "beta1": 0.8, "beta2": 0.95, "eps": 1e-3, "weight_decay": 0.1}),
    "adam-gdtuo": (AdamRule, {"gdtuo_init": True}, {"lr": 0.01, "eps": 1e-3}),
    # the reference's mode: Adam's betas take the full derivative of beta^t (the default holds its history)
    "adam-gdtuo-mode": (AdamRule, {"gdtuo_mode": True}, {"lr": 0.01, "beta1": 0.8, "beta2": 0.95, "eps": 1e-3}),
    "adagrad": (AdaGradRule, {}, {"lr": 0.1, "eps": 1e-3}),
    "adagrad-wd": (AdaGradRule, {}, {"lr": 0.1, "eps": 1e-3, "weight_decay": 0.05}),
    "adagrad-gdtuo": (AdaGradRule, {"gdtuo_init": True, "eps_in_sqrt": True}, {"lr": 0.1, "eps": 1e-3}),
    "rmsprop": (RMSPropRule, {}, {"lr": 0.01, "alpha": 0.9, "eps": 1e-3}),
    "rmsprop-wd": (RMSPropRule, {}, {"lr": 0.01, "alpha": 0.9, "eps": 1e-3, "weight_decay": 0.05}),
    "rmsprop-gdtuo": (RMSPropRule, {"gdtuo_init": True, "eps_in_sqrt": True}, {"lr": 0.01, "alpha": 0.9, "eps": 1e-3}),
}

SHAPES = [(3, 4), (5,), (2, 3, 2)]
COUNTS = [3, 6, 4]  # per-tensor step counts that differ, as at the weight level


def _learn_sets(rule: type[Rule], values: dict[str, float]) -> list[tuple[str, ...]]:
    names = rule.learnable()
    return [(n,) for n in names] + [names, tuple(n for n in names if n != "lr")]


PARAMS = [
    pytest.param(case, learn, id=f"{case}:{'+'.join(learn)}")
    for case, (rule, _, values) in CASES.items()
    for learn in _learn_sets(rule, values)
]


class Setup:
    """A rule at non-zero state on three tensors of float64, learning ``learn`` per tensor on a log /
    logit scale (so the chain to theta is tested too), values that differ per tensor. One tensor has a row whose gradient was always
    zero: its second moment is exactly zero there."""

    def __init__(self, case: str, learn: tuple[str, ...]):
        rule_cls, options, values = CASES[case]
        options = dict(options)
        self.rule = rule_cls("gdtuo" if options.pop("gdtuo_mode", False) else "default", **options)
        self.learn = learn
        self.values = {n: float(values.get(n, s.default)) for n, s in rule_cls.hyperparameters.items()}
        if "momentum" in learn:
            self.rule.options["learn_momentum"] = True
        g = torch.Generator().manual_seed(0)
        dt = torch.float64
        self.params = [torch.randn(s, generator=g, dtype=dt) for s in SHAPES]
        state = [self.rule.init_state(p, self.values) for p in self.params]
        self.state = {n: [s[n] for s in state] for n in state[0]}
        self.zero = frozenset(n for n, v in self.values.items() if v == 0.0 and n not in learn)
        for _ in range(3):  # history: non-zero moments
            grads = self._grads(g)
            work = {"direction": [torch.empty_like(p) for p in self.params]}
            st = self.rule.update(self.params, grads, self.state, work, self.hyper(None), 2)
            tangents.apply_step(self.params, st, None)
        self.grads = self._grads(g)
        self.step = torch.tensor(COUNTS, dtype=dt)
        self.theta = torch.tensor(
            [_raw(self.rule, n, self.values[n]) * (1 + 0.01 * i) + 0.01 * i for n in learn for i in range(len(SHAPES))],
            dtype=dt,
        )

    def _grads(self, g: torch.Generator) -> list[torch.Tensor]:
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in self.params]
        grads[0][0] = 0.0
        return grads

    def hyper(self, theta: torch.Tensor | None) -> Hyper:
        n = len(SHAPES)
        out = {}
        for name, spec in self.rule.hyperparameters.items():
            if spec.kind == "flag":
                continue
            if theta is not None and name in self.learn:
                j = self.learn.index(name)
                out[name] = to_natural(theta[j * n : (j + 1) * n], _how(self.rule, name, self.values[name]))
            else:
                out[name] = torch.full((n,), self.values[name], dtype=torch.float64)
        return Hyper(out, self.zero)

    def run(self, how: str, trace: float = 0.0, z0: dict | None = None):
        """New params, state and tangents by ``how`` ("written" or "forward_ad"), on copies."""
        params = [p.clone() for p in self.params]
        state = {n: [t.clone() for t in ts] for n, ts in self.state.items()}
        out = {n: [t.clone() for t in z0[n]] if z0 else [torch.empty_like(p) for p in params] for n in self.learn}
        if how == "written":
            work = {"direction": [torch.empty_like(p) for p in params]}
            tangents.written(
                self.rule, params, self.grads, state, work, self.hyper, self.step, self.theta, self.learn, out, trace
            )
        else:
            tangents.forward_ad(
                self.rule, params, self.grads, state, self.hyper, self.step, self.theta, self.learn, out, trace
            )
        return params, state, out

    def new_params(self, theta: torch.Tensor) -> list[torch.Tensor]:
        params = [p.clone() for p in self.params]
        state = {n: [t.clone() for t in ts] for n, ts in self.state.items()}
        work = {"direction": [torch.empty_like(p) for p in params]}
        tangents.apply_step(
            params, self.rule.update(params, self.grads, state, work, self.hyper(theta), self.step), None
        )
        return params


def _how(rule: Rule, name: str, value: float) -> str:
    """Log or logit, as in the default mode; raw for a value learned from 0 (weight decay, momentum)."""
    if value == 0.0:
        return "identity"
    return "log" if rule.hyperparameters[name].kind == "step" else "logit"


def _raw(rule: Rule, name: str, value: float) -> float:
    return to_raw(value, _how(rule, name, value))


def _close(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float) -> None:
    scale = max(float(t.abs().max()) for t in b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("case, learn", PARAMS)
def test_written_tangent_is_the_forward_ad_tangent(case, learn):
    s = Setup(case, learn)
    p_w, st_w, out_w = s.run("written")
    p_f, st_f, out_f = s.run("forward_ad")
    _close(p_w, p_f, 1e-12)
    for n in st_w:
        _close(st_w[n], st_f[n], 1e-12)
    for n in learn:
        assert all(torch.isfinite(t).all() for t in out_w[n])
        assert any(t.abs().max() > 0 for t in out_w[n]), n
        _close(out_w[n], out_f[n], 1e-6)


@pytest.mark.parametrize("case, learn", [p for p in PARAMS if len(p.values[1]) == 1])
def test_written_tangent_is_a_central_finite_difference(case, learn, monkeypatch):
    s = Setup(case, learn)
    _, _, out = s.run("written")
    (name,) = learn
    h = 1e-5
    if name in ("beta1", "beta2") and s.rule.mode == "default":
        # Adam's bias correction beta^t holds the history: only this step's factor moves with theta.
        base = s.hyper(s.theta)

        def held_power(beta: torch.Tensor, step):
            held = min((base[n] for n in ("beta1", "beta2")), key=lambda v: float((v - beta).abs().max()))
            return beta * held ** (step - 1)

        monkeypatch.setattr(adam_level, "history_held_power", held_power)
    fd = [(a - b) / (2 * h) for a, b in zip(s.new_params(s.theta + h), s.new_params(s.theta - h), strict=True)]
    # Where the second moment is exactly 0, sqrt has a kink: the tangent is taken as 0 through it.
    for t in (out[name], fd):
        t[0][0] = 0.0
    _close(out[name], fd, 1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_written_tangent_with_a_trace(case):
    """The buffers hold Z_{t-1} and become mu Z_{t-1} + the step's tangent."""
    rule_cls, _, values = CASES[case]
    learn = _learn_sets(rule_cls, values)[-2]  # everything
    s = Setup(case, learn)
    g = torch.Generator().manual_seed(5)
    z0 = {n: [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in s.params] for n in learn}
    _, _, out_w = s.run("written", 0.7, z0)
    _, _, out_f = s.run("forward_ad", 0.7, z0)
    _, _, plain = s.run("written")
    for n in learn:
        _close(out_w[n], out_f[n], 1e-6)
        _close(out_w[n], [0.7 * z + t for z, t in zip(z0[n], plain[n], strict=True)], 1e-12)


def test_zero_second_moment_has_a_zero_tangent():
    """A row that never had a gradient: v = 0 there, and the tangents are 0, not NaN (a weight decay
    learned from 0 moves m there, so its tangent is not 0)."""
    s = Setup("adam", AdamRule.learnable())
    _, _, out = s.run("written")
    for n in out:
        assert (out[n][0][0] == 0).all() or n == "weight_decay", n
        assert torch.isfinite(out[n][0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [0.625003, 0.8, 0.9, 0.95])
def test_betas_hold_still_after_a_first_step_that_carries_no_information_about_them(dtype, beta):
    """At a tensor's first step Adam's update is g / (|g| + eps) whatever the betas are, so their tangents
    are exactly 0; rounding noise there would become a full step of the level above under normalize."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5, dtype=dtype))
    spec = f"adam(lr=0.01,beta1={beta},beta2={beta},learn=beta1+beta2)/adam(lr=0.01,normalize=true)"
    opt = hh.tower([w], spec)
    seen = []
    for _ in range(2):
        w.grad = torch.randn_like(w)
        opt.step()
        seen.append(opt.hyperparameters()[0])
    assert seen[1] == seen[0]


# The tower end to end: the written path against forward AD through every level, over steps in which
# one tensor has no gradient (so the per-tensor step counts differ), in every scope, with the ramp,
# a trace, normalisation, and three levels.
TOWERS = [
    ("adam(lr=0.01,weight_decay=0.01,learn=lr+beta1+beta2+eps+weight_decay)/adam(lr=0.01)", None, "shared"),
    ("adamw(lr=0.01,learn=lr+beta1+beta2+eps+weight_decay)/adam(lr=0.01,ramp=0.001)", None, "tensor"),
    # Not the betas under normalize: at step 1 forward AD's tangents are rounding noise (the written ones are
    # exactly 0), which h / |Z| scales up.
    ("adamw(lr=0.01,eps=1e-3,learn=eps+weight_decay)/adam(lr=0.01,normalize=true,trace=0.9)", None, "group"),
    ("adam(lr=0.01)/sgd(lr=1e-5)", "gdtuo", "shared"),
    (
        "sgd(lr=0.05,momentum=0.9,nesterov=true,weight_decay=0.01,learn=lr+momentum+weight_decay)"
        "/adam(lr=0.01,trace=0.9,normalize=true)",
        None,
        "tensor",
    ),
    ("sgd(lr=0.05,momentum=0.5)/sgd(lr=1e-3)", "gdtuo", "shared"),
    ("sgd(lr=0.05,momentum=0.9,learn=lr+momentum)/adam(lr=0.01,ramp=0.001)", None, "shared"),
    ("adam(lr=0.01)/adam(lr=0.01,ramp=0.001,normalize=true,ramp_search=0.5)", None, "group"),
    (
        "rmsprop(lr=0.01,weight_decay=0.01,learn=lr+alpha+eps+weight_decay)/adam(lr=0.01,learn=lr+beta1)/sgd(lr=1e-3)",
        None,
        "group",
    ),  # fmt: skip
    ("rmsprop(lr=0.01)/sgd(lr=1e-3)", "gdtuo", "shared"),
    ("adagrad(lr=0.1,weight_decay=0.01,learn=lr+eps+weight_decay)/rmsprop(lr=0.001,learn=lr+alpha)/sgd", None, "group"),
]


def _flat(hyper: list[dict]) -> list[float]:
    return [x for level in hyper for v in level.values() for x in (v if isinstance(v, list) else [v])]


def _train(spec: str, compat, scope: str, written: bool, make_mlp, batches):
    model = make_mlp()
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    opt = hh.tower(groups, spec, compat=compat, scope=scope)
    if not written:
        for rule in opt._rules:
            rule.writes_tangents = False
    start = _flat(opt.hyperparameters())
    for i, (x, y) in enumerate(batches(8)):
        F.mse_loss(model(x), y).backward()
        if i % 3 == 1:
            model[2].bias.grad = None  # this tensor skips a step: its step count falls behind
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], _flat(opt.hyperparameters()), start


@pytest.mark.parametrize("spec, compat, scope", TOWERS)
def test_tower_with_written_tangents_matches_forward_ad(spec, compat, scope, float64, make_mlp, batches):
    w_written, h_written, start = _train(spec, compat, scope, True, make_mlp, batches)
    w_ad, h_ad, _ = _train(spec, compat, scope, False, make_mlp, batches)
    for a, b in zip(w_written, w_ad, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert h_written == pytest.approx(h_ad, rel=1e-8)
    assert h_written != pytest.approx(start, rel=1e-6)  # the levels above did learn


def test_accelerator_code_paths_match(monkeypatch, float64, make_mlp, batches):
    """Off the CPU the hyperparameters reach the ``_foreach`` ops as 0-dim tensors, the one-pass
    ``out=`` ops give way to copies and in-place ops, the step size's ratio cannot be read for free
    (so a rule does not build its direction as the lr's tangent), and the hypergradient multiplies the
    written tangents by the gradients in place. The same towers on the CPU with
    those paths forced must give the same numbers."""
    import hf_hyperopt.levels.adagrad as adagrad_mod
    import hf_hyperopt.levels.adam as adam_mod
    import hf_hyperopt.levels.base as base_mod
    import hf_hyperopt.levels.rmsprop as rmsprop_mod
    import hf_hyperopt.levels.sgd as sgd_mod
    import hf_hyperopt.optim.hypergradients as hypergradients_mod

    expected = [_train(spec, compat, scope, True, make_mlp, batches) for spec, compat, scope in TOWERS]

    def as_tensors(x):
        return list(x.unbind(0))

    for module in (base_mod, adam_mod, sgd_mod, adagrad_mod, rmsprop_mod, tangents):
        if hasattr(module, "scalars"):
            monkeypatch.setattr(module, "scalars", as_tensors)
    for module in (base_mod, tangents, hypergradients_mod):  # and the trace, and |Z|, as on an accelerator
        monkeypatch.setattr(module, "one_pass", lambda *lists: False)
    # The hypergradient consumes written tangents in place (a held one, the rule's state, never).
    monkeypatch.setattr(hypergradients_mod, "consumes_tangents", lambda opt, b: not opt.levels[1].trace)
    monkeypatch.setattr(tangents, "_near_one", lambda x: False)
    for module in (adam_mod, sgd_mod):  # the direction is not built as the lr's tangent either
        monkeypatch.setattr(module, "lr_tangent_factor", lambda *args: None)
    for (spec, compat, scope), (w_cpu, h_cpu, _) in zip(TOWERS, expected, strict=True):
        w, h, _ = _train(spec, compat, scope, True, make_mlp, batches)
        for a, b in zip(w, w_cpu, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert h == pytest.approx(h_cpu, rel=1e-8), spec


class _OldStyleMomentumSGD(SGDRule):
    """A user's rule as written before rules wrote tangents: ``update`` without ``tangents``."""

    name = "old_sgd"
    writes_tangents = False

    def update(self, params, grads, state, work, hp, step):
        return super().update(params, grads, state, work, hp, step)


def test_a_rule_without_written_tangents_learns_by_forward_ad(float64, make_mlp, batches):
    """The fallback: a ``Rule`` subclass that does not write tangents gets them from forward-mode AD,
    and learns what the built-in rule learns with written ones."""
    from hf_hyperopt.optim.engine import LevelConfig, TowerOptimizer

    out = []
    for rule in (_OldStyleMomentumSGD, SGDRule):
        model = make_mlp()
        levels = [
            LevelConfig(rule, {"lr": 0.05, "momentum": 0.5}, learn=("lr", "momentum")),
            LevelConfig(AdamRule, {"lr": 0.01}),
        ]
        opt = TowerOptimizer(model.parameters(), levels)
        for x, y in batches(8):
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        out.append(([p.detach().clone() for p in model.parameters()], _flat(opt.hyperparameters())))
    (w_ad, h_ad), (w, h) = out
    for a, b in zip(w_ad, w, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert h_ad == pytest.approx(h, rel=1e-8)
    assert h != pytest.approx([0.05, 0.5, 0.01], rel=1e-6)


def test_a_user_rule_with_a_second_workspace_buffer_learns_its_lr():
    """The direction's workspace is the lr's tangent buffer; the rule's other workspace buffers stay its own."""
    from hf_hyperopt.levels.base import Step, Tangent
    from hf_hyperopt.optim.engine import LevelConfig, TowerOptimizer

    class SignSGD(SGDRule):
        name = "signsgd"
        workspace_names = ("direction", "scratch")

        def update(self, params, grads, state, work, hp, step, tangents=None):
            torch._foreach_copy_(work["scratch"], grads)
            torch._foreach_sign_(work["scratch"])
            torch._foreach_copy_(work["direction"], work["scratch"])
            scale = -hp["lr"]
            written = {n: Tangent(direction=-torch.ones_like(scale)) for n in tangents or {}}
            return Step(work["direction"], scale, tangents=written)

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    opt = TowerOptimizer([w], [LevelConfig(SignSGD, {"lr": 0.05}, learn=("lr",)), LevelConfig(AdamRule, {"lr": 0.01})])
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    assert opt.hyperparameters()[0]["lr"] != pytest.approx(0.05)
