"""Sensitivity benchmark: final quality against the initial learning rate, towers beside their peers.

Every method trains the same model from the same seed for the same number of steps, once per initial
learning rate of a sweep over several orders of magnitude; the final test metric and whether the run
diverged are recorded. A method that needs no tuning scores near its best everywhere in the sweep.

Commands (run from the repository root; each writes ``<out>/sensitivity_<task>.{csv,json,md,png}``)::

    # (a) the paper's MLP on scikit-learn's digits: 7 learning rates x 3 seeds x all methods (~10 min)
    nice python -m benchmarks.sensitivity --task digits --seeds 0 1 2

    # choose the default tower: HyperAdam under several upper levels only
    nice python -m benchmarks.sensitivity --task digits --seeds 0 1 2 --methods tower_sweep --tag hyper

    # (b) pretrained MiniLM classifying Shakespeare speeches (comedy or tragedy?, data/shakespeare_genre),
    # (c) a small GPT-2 trained from scratch on data/shakespeare_lm
    nice python -m benchmarks.sensitivity --task minilm --seeds 0
    nice python -m benchmarks.sensitivity --task gpt2 --seeds 0
    # the classification demo's setting, its length, scored on its whole validation split
    nice python -m benchmarks.sensitivity --task minilm_demo --steps 450 --seeds 0

    # any tower above Adam on the weights, without a registered name (a screen)
    nice python -m benchmarks.sensitivity --task gpt2 --seeds 0 --methods "tower:adam(lr=0.05,ramp=0.001,trace=0.99)"

    # one sweep from runs made by several commands (other methods, other seeds) of one task setting
    python -m benchmarks.sensitivity --merge results/sensitivity_gpt2_300.json /tmp/more.json --tag 300

    # a smoke run in seconds (what tests/test_evidence.py runs)
    python -m benchmarks.sensitivity --task digits --quick --out /tmp/sens

Learning rates: the ``lr`` methods sweep ``--lrs`` (default 1e-7 .. 1e-1, one per decade);
Prodigy, D-Adaptation, DoG and L-DoG take a multiplier of their estimated step size whose natural value is 1, so
they sweep ``--multipliers`` (default 1e-3 .. 1e3, the same number of decades).

Summary columns (``sensitivity_<task>.md``): best and worst mean metric over the sweep, the number of
diverged runs, and ``width``: the number of decades covered by the longest run of consecutive sweep
points whose mean metric is within 1% (relative) of the method's own best. ``within_adamw`` counts
sweep points within 1% of the best tuned AdamW of the sweep (its best point with a constant lr or HF's
linear decay), which ``worst vs best AdamW`` compares each method's worst point with.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

import hf_hyperopt as hh

from . import (
    tasks,
    top_levels,  # noqa: F401  (registers the experimental top levels for spec strings)
)
from .provenance import git_commit
from .tasks import (
    SAMPLINGS,
    Task,
    cancer_task,
    diabetes_task,
    digits_task,
    gpt2_finetune_task,
    gpt2_task,
    minilm_demo_task,
    minilm_task,
    stream_task,
    vit_digits_task,
)

# ---------------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """An optimizer under test. ``build(params, lr, steps)`` returns ``(optimizer, scheduler_or_None)``.

    ``scale`` is ``"lr"`` (the sweep value is the initial learning rate) or ``"multiplier"`` (a
    multiplier of a self-estimated step size, natural value 1). ``reference`` marks the paper's own
    implementation, which needs its own training loop.
    """

    name: str
    family: str
    build: Callable | None
    scale: str = "lr"
    reference: str | None = None


def _adamw(params, lr, steps):
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0), None


def _adamw_linear(params, lr, steps):
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return opt, get_linear_schedule_with_warmup(opt, 0, steps)


def _schedule_free(params, lr, steps):
    import schedulefree

    return schedulefree.AdamWScheduleFree(params, lr=lr, weight_decay=0.0), None


def _prodigy(params, lr, steps):
    import prodigyopt

    return prodigyopt.Prodigy(params, lr=lr, weight_decay=0.0), None


def _dadapt(params, lr, steps):
    import dadaptation

    return dadaptation.DAdaptAdam(params, lr=lr), None


def _mechanic(params, lr, steps):
    from mechanic_pytorch import mechanize

    # Mechanic learns a scale on the base optimizer's update; the base AdamW's lr is the knob left.
    return mechanize(torch.optim.AdamW)(params, lr=lr, weight_decay=0.0), None


def _dog(variant: str):
    """DoG (``"DoG"``) or L-DoG (``"LDoG"``: its step size estimated per tensor, the variant its authors
    offer beside DoG)."""

    def build(params, lr, steps):
        import logging

        import dog

        # DoG's lr is a multiplier c of its estimated step size (natural value 1, as Prodigy's); it warns
        # on any other value, which is the point of this sweep.
        logging.getLogger(dog.dog.__name__).setLevel(logging.ERROR)
        return getattr(dog, variant)(params, lr=lr, weight_decay=0.0), None

    return build


def _sgd(params, lr, steps):
    return torch.optim.SGD(params, lr=lr), None


def _hyper_adam_default(params, lr, steps):
    return hh.HyperAdam(params, lr=lr), None


def _hyper_sgd_default(params, lr, steps):
    return hh.HyperSGD(params, lr=lr), None


def _tower(spec: str, weights: str = "adam", learn: str = "lr"):
    def build(params, lr, steps):
        return hh.tower(params, f"{weights}(lr={lr!r},learn={learn})/{spec}"), None

    return build


PEERS: dict[str, Method] = {
    "adamw": Method("adamw", "AdamW, constant lr", _adamw),
    "sgd": Method("sgd", "SGD, constant lr", _sgd),
    "adamw_linear": Method("adamw_linear", "AdamW, linear decay (HF default)", _adamw_linear),
    "schedule_free": Method("schedule_free", "schedule-free AdamW", _schedule_free),
    "prodigy": Method("prodigy", "Prodigy", _prodigy, scale="multiplier"),
    "dadapt_adam": Method("dadapt_adam", "D-Adaptation Adam", _dadapt, scale="multiplier"),
    "mechanic": Method("mechanic", "Mechanic (AdamW base)", _mechanic),
    "dog": Method("dog", "DoG", _dog("DoG"), scale="multiplier"),
    "ldog": Method("ldog", "L-DoG (DoG per layer)", _dog("LDoG"), scale="multiplier"),
    "gdtuo_adam_sgd": Method("gdtuo_adam_sgd", "reference gdtuo Adam / SGD(1e-5)", None, reference="adam/sgd(1e-5)"),
}

# Upper levels for HyperAdam: height 1 (one level above the weights), 2 and 3. "The default" in the comments
# below is the default of the time these towers were measured: none has the default's timescale=100,
# and "hyper_adam(ramp_search=0.3)" is the default before it (the name merged files give its runs).
TOWERS: dict[str, str] = {
    "hyper_adam/adam(0.005)": "adam(lr=0.005)",
    "hyper_adam/adam(0.01)": "adam(lr=0.01)",
    "hyper_adam/adam(0.02)": "adam(lr=0.02)",
    "hyper_adam/adam(0.05)": "adam(lr=0.05)",
    "hyper_adam/adam(0.1)": "adam(lr=0.1)",
    "hyper_adam/sgd(1e-1)": "sgd(lr=0.1)",
    "hyper_adam/adam(0.02)/adam(0.01)": "adam(lr=0.02)/adam(lr=0.01)",
    "hyper_adam/adam(0.05)/adam(0.01)": "adam(lr=0.05)/adam(lr=0.01)",
    "hyper_adam/adam(0.02)/adam/adam": "adam(lr=0.02)/adam(lr=0.01)/adam(lr=0.01)",
    "hyper_adam/adam(0.05)/adam/adam": "adam(lr=0.05)/adam(lr=0.01)/adam(lr=0.01)",
    # the default without its ramp, and with the trace (off by default)
    "hyper_adam-ramp": "adam(lr=0.05,normalize=true)",
    "hyper_adam+trace": "adam(lr=0.05,ramp=0.001,normalize=true,trace=0.9)",
    # the default with another step size at its top level (the default's is 0.05)
    **{f"hyper_adam(top={lr})": f"adam(lr={lr},ramp=0.001,normalize=true)" for lr in ("0.01", "0.02", "0.1", "0.2")},
    # ... the same since the default searches past the ramp's start
    **{
        f"hyper_adam(top={lr},ramp_search=0.3)": f"adam(lr={lr},ramp=0.001,normalize=true,ramp_search=0.3)"
        for lr in ("0.01", "0.02", "0.1", "0.2")
    },
    # ... with a level above the top that learns the top's step size (the paper's stacking)
    **{
        f"hyper_adam(top={lr})/adam({l2})": f"adam(lr={lr},ramp=0.001,normalize=true)/adam(lr={l2},normalize=true)"
        for lr in ("0.01", "0.05", "0.2")
        for l2 in ("0.01", "0.03")
    },
    # ... with an experimental top whose step adapts to the hypergradient's consistency (top_levels.py)
    **{
        f"hyper_adam/{r}({lr})": f"{r}(lr={lr},ramp=0.001,normalize=true)"
        for r in ("signgain", "snrpow")
        for lr in ("0.01", "0.05", "0.2", "0.5")
    },
    # ... and with a top that averages its hypergradients over ~100 steps instead of ~10
    **{
        f"hyper_adam(top={lr},beta1=0.99)": f"adam(lr={lr},beta1=0.99,ramp=0.001,normalize=true)"
        for lr in ("0.02", "0.05", "0.1", "0.2")
    },
    # ... learning from a hypergradient over a horizon (the tangent trace) with another top step: does the
    # horizon widen the range of good top steps?
    **{
        f"hyper_adam(top={lr},trace={mu})": f"adam(lr={lr},ramp=0.001,normalize=true,ramp_search=0.3,trace={mu})"
        for mu in ("0.9", "0.99")
        for lr in ("0.02", "0.05", "0.1", "0.2")
    },
    # ... with a shorter memory of the top's second moment (the default's beta2 is 0.999), alone and with
    # the trace: candidates for the noisy quadratic (tests/test_tower_quadratic.py)
    **{
        f"hyper_adam(beta2={b2}{',trace=' + mu if mu else ''})": (
            f"adam(lr=0.05,beta2={b2},ramp=0.001,normalize=true{',trace=' + mu if mu else ''})"
        )
        for b2 in ("0.9", "0.95", "0.96", "0.97", "0.98", "0.99")
        for mu in ("", "0.9", "0.99")
    },
    # ... learning from the slope divided by the next gradient's norm to the power c as well (cosine=c,
    # experimental; 1 is the cosine of the next gradient and the last update)
    **{
        f"hyper_adam(cosine={c})": f"adam(lr=0.05,ramp=0.001,normalize=true,cosine={c})"
        for c in ("0.3", "0.5", "0.7", "1.0")
    },
    # ... with the ramp extended past its target while the lr's hypergradient asks for more (ramp_search=c:
    # while the cosine of the next gradient and the last update is below -c; the default's is 0.3, and
    # ramp_search=0 is the default before it searched)
    **{
        f"hyper_adam(ramp_search={c})": f"adam(lr=0.05,ramp=0.001,normalize=true,ramp_search={c})"
        for c in ("0", "0.1", "0.2", "0.3", "0.4", "0.5")
    },
}


# Upper levels for HyperSGD (plain SGD on the weights, no momentum)
SGD_TOWERS: dict[str, str] = {
    "hyper_sgd(ramp_search=0)": "adam(lr=0.05,ramp=0.001,normalize=true,ramp_search=0)",
    "hyper_sgd(ramp_search=0.3)": "adam(lr=0.05,ramp=0.001,normalize=true,ramp_search=0.3)",
}


# The default tower learning more than the weights' lr (learn=lr+beta1, ...)
LEARN_TOWERS: dict[str, str] = {f"hyper_adam(learn={learn})": learn for learn in ("lr+beta1", "lr+beta1+beta2")}


def _tower_method(name: str, spec: str, weights: str = "adam") -> Method:
    """The tower ``spec`` above ``weights`` (with a learned lr), labelled by its height and levels."""
    return Method(name, f"tower h{spec.count('/') + 1}: {weights}/{spec}", _tower(spec, weights))


def methods_registry() -> dict[str, Method]:
    out = dict(PEERS)
    default = hh.DEFAULT_HYPER["default"]
    out["hyper_adam"] = Method("hyper_adam", f"HyperAdam default, h1: adam/{default}", _hyper_adam_default)
    out["hyper_sgd"] = Method("hyper_sgd", f"HyperSGD default, h1: sgd/{default}", _hyper_sgd_default)
    for name, spec in TOWERS.items():
        out[name] = _tower_method(name, spec)
    for name, spec in SGD_TOWERS.items():
        out[name] = _tower_method(name, spec, "sgd")
    for name, learn in LEARN_TOWERS.items():
        out[name] = Method(name, f"HyperAdam default learning {learn}", _tower(default, learn=learn))
    return out


# The peers and the default tower: the quick smoke set; "all" adds the towers of other heights.
_PEERS_AND_DEFAULT = [
    "adamw",
    "adamw_linear",
    "schedule_free",
    "prodigy",
    "dadapt_adam",
    "mechanic",
    "dog",
    "ldog",
    "gdtuo_adam_sgd",
    "hyper_adam",
]
METHOD_SETS = {
    "all": [
        *_PEERS_AND_DEFAULT,
        "hyper_adam/adam(0.01)",
        "hyper_adam/adam(0.05)/adam(0.01)",
        "hyper_adam/adam(0.05)/adam/adam",
    ],
    "tower_sweep": ["adamw", *TOWERS],
    "quick": _PEERS_AND_DEFAULT,
}

# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def final_lr(opt: torch.optim.Optimizer) -> float:
    """The step size the optimizer used last (learned, scheduled or self-estimated)."""
    if isinstance(opt, hh.TowerOptimizer):
        lr = opt.hyperparameters()[0]["lr"]
        return float(lr if isinstance(lr, float) else lr[0])
    g = opt.param_groups[0]
    if "_mechanic" in opt.state:  # Mechanic: the base lr times its learned scale
        return float(g["lr"] * opt.state["_mechanic"]["s"].sum())
    if "eta" in g:  # DoG: its step size (one for the whole group); L-DoG: the median of its per-tensor ones
        # (the largest would be that of a tensor with no gradient, e.g. a key bias under softmax: its step
        # stays at its start, far above the rest)
        etas = g["eta"] if isinstance(g["eta"], list) else [g["eta"]]
        return float(torch.stack([torch.as_tensor(e, dtype=torch.float64).max().cpu() for e in etas]).quantile(0.5))
    return float(g["lr"] * g.get("d", 1.0))


def train_torch(task: Task, method: Method, lr: float, seed: int) -> dict:
    model = task.build_model(seed)
    model.train()
    opt, sched = method.build([p for p in model.parameters() if p.requires_grad], lr, task.steps)
    return _loop(task, model, seed, opt, sched)


def _loop(task: Task, model: nn.Module, seed: int, opt, sched) -> dict:
    losses: list[float] = []
    # The step size every 1/20 of the run: where a learned lr went, not only where it ended.
    every = max(1, task.steps // 20)
    lr_trajectory: list[tuple[int, float]] = []
    batches = task.batches(seed)
    if isinstance(opt, hh.TowerOptimizer):
        opt.set_horizon(task.horizon)  # as the Trainer integration does (trace=auto)
    t0 = time.perf_counter()
    for step in range(task.steps):
        if hasattr(opt, "train"):
            opt.train()  # schedule-free AdamW keeps two sequences; train() selects the training one
        loss = task.loss(model, next(batches))
        if not torch.isfinite(loss):
            losses.append(float("inf"))
            break
        losses.append(loss.item())
        loss.backward()
        try:
            opt.step()
        except (AssertionError, RuntimeError, ValueError) as e:
            # A peer that gives up on non-finite statistics (DoG asserts) has diverged: record it as such
            # instead of losing the whole sweep.
            print(f"  {type(opt).__name__} stopped at step {len(losses)}: {type(e).__name__}: {e}", file=sys.stderr)
            losses.append(float("inf"))
            break
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % every == 0 or step + 1 == task.steps:
            lr_trajectory.append((step + 1, final_lr(opt)))
    seconds = time.perf_counter() - t0
    if hasattr(opt, "eval"):
        opt.eval()
    return _finish(task, model, losses, seconds, final_lr(opt)) | {"lr_trajectory": lr_trajectory}


def train_reference(task: Task, method: Method, lr: float, seed: int) -> dict:
    """The paper's implementation: ``ModuleWrapper`` and ``backward(create_graph=True)``."""
    import warnings

    from gradient_descent_the_ultimate_optimizer import gdtuo

    # The reference's create_graph=True backward warns about its (known) reference cycle every run.
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    model = task.build_model(seed)
    model.train()
    assert method.reference == "adam/sgd(1e-5)"
    mw = gdtuo.ModuleWrapper(model, optimizer=gdtuo.Adam(alpha=lr, optimizer=gdtuo.SGD(1e-5)))
    mw.initialize()
    losses: list[float] = []
    batches = task.batches(seed)
    t0 = time.perf_counter()
    for _ in range(task.steps):
        mw.begin()
        mw.zero_grad()
        loss = task.loss(mw.module, next(batches))
        if not torch.isfinite(loss):
            losses.append(float("inf"))
            break
        losses.append(loss.item())
        loss.backward(create_graph=True)
        mw.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        for p in mw.parameters.values():
            p.grad = None
    return _finish(task, model, losses, seconds, float(mw.optimizer.parameters["alpha"].detach()))


def _finish(task: Task, model: nn.Module, losses: list[float], seconds: float, lr_end: float) -> dict:
    first = losses[0]
    last = sum(losses[-5:]) / len(losses[-5:])
    # Diverged: the loss became non-finite, or ended well above where it started.
    diverged = not math.isfinite(last) or last > 1.5 * first or len(losses) < task.steps
    metric = task.evaluate(model)
    if not math.isfinite(metric):
        metric = task.chance
    # A run that blew up keeps no meaningful metric even if a lucky eval says otherwise.
    if diverged and (not math.isfinite(last) or len(losses) < task.steps):
        metric = task.chance
    return {
        "metric": metric,
        "diverged": diverged,
        "train_loss_first": first,
        "train_loss_last": last,
        "final_lr": lr_end if math.isfinite(lr_end) else float("nan"),
        "seconds": seconds,
    }


def run_one(task: Task, method: Method, lr: float, seed: int) -> dict:
    if method.reference:
        return train_reference(task, method, lr, seed)
    return train_torch(task, method, lr, seed)


# ---------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------


# The methods whose best point is "the best tuned AdamW" the summary measures every method against.
TUNED_ADAMW = ("adamw", "adamw_linear")


def summarise(rows: list[dict], higher: bool) -> list[dict]:
    """Per method: best / worst mean metric over the sweep, diverged runs, width within 1% of its best."""
    by_method: dict[str, dict[float, list[dict]]] = {}
    for r in rows:
        by_method.setdefault(r["method"], {}).setdefault(r["lr"], []).append(r)
    better = (lambda a, b: a >= b) if higher else (lambda a, b: a <= b)
    pick = max if higher else min
    worst_of = min if higher else max

    def mean(xs):
        return sum(xs) / len(xs)

    # The baseline is tuned AdamW as issue 10 defines it: the best point of an lr grid, with a constant lr
    # or HF's linear decay, whichever ends better (a schedule can win where a constant lr does not).
    tuned = [runs for name in TUNED_ADAMW for runs in by_method.get(name, {}).values()]
    adamw_best = pick(mean([r["metric"] for r in runs]) for runs in tuned) if tuned else None

    out = []
    for name, per_lr in by_method.items():
        lrs = sorted(per_lr)
        means = [mean([r["metric"] for r in per_lr[lr]]) for lr in lrs]
        stds = [_std([r["metric"] for r in per_lr[lr]]) for lr in lrs]
        best, worst = pick(means), worst_of(means)
        tol = 0.01 * abs(best)
        ok = [better(m, best - tol) if higher else better(m, best + tol) for m in means]
        width, run_start = 0.0, None
        for i, good in enumerate(ok):
            if good:
                run_start = i if run_start is None else run_start
                width = max(width, math.log10(lrs[i] / lrs[run_start]))
            else:
                run_start = None
        within_adamw = None
        if adamw_best is not None:
            tol_a = 0.01 * abs(adamw_best)
            within_adamw = sum(m >= adamw_best - tol_a if higher else m <= adamw_best + tol_a for m in means)
        out.append(
            {
                "method": name,
                "family": per_lr[lrs[0]][0]["family"],
                "scale": per_lr[lrs[0]][0]["scale"],
                "best": best,
                "best_lr": lrs[means.index(best)],
                "worst": worst,
                "worst_lr": lrs[means.index(worst)],
                "max_std": max(stds),
                "width_decades": width,
                "points_within_1pct": sum(ok),
                "points": len(lrs),
                "within_adamw_best": within_adamw,
                "diverged_runs": sum(r["diverged"] for runs in per_lr.values() for r in runs),
                "runs": sum(len(runs) for runs in per_lr.values()),
                "worst_vs_adamw_best_pct": None
                if adamw_best is None
                else 100.0 * (worst - adamw_best) / abs(adamw_best) * (1 if higher else -1),
            }
        )
    return out


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _num(x: float) -> str:
    """Two decimals, or three significant digits for values below 1 (small errors) and for the huge values
    of diverged runs (capped perplexity)."""
    return f"{x:.2f}" if 1 <= abs(x) < 1e6 else f"{x:#.3g}" if abs(x) < 1 else f"{x:.3g}"


def markdown_table(summary: list[dict], metric: str) -> str:
    head = (
        f"| method | sweep | best {metric} | worst | worst vs best AdamW | width within 1% of own best "
        "| points within 1% of best AdamW | diverged runs |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for s in summary:
        sweep = "multiplier" if s["scale"] == "multiplier" else "lr"
        pct = s["worst_vs_adamw_best_pct"]
        vs = "n/a" if pct is None else f"{pct:+.1f}%" if abs(pct) < 1e4 else f"{pct:+.1e}%"
        within = "n/a" if s["within_adamw_best"] is None else f"{s['within_adamw_best']}/{s['points']}"
        lines.append(
            f"| {s['family']} | {sweep} | {_num(s['best'])} (at {s['best_lr']:g}) | {_num(s['worst'])} (at {s['worst_lr']:g}) "
            f"| {vs} | {s['width_decades']:.0f} decades ({s['points_within_1pct']}/{s['points']} points) "
            f"| {within} | {s['diverged_runs']}/{s['runs']} |"
        )
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], task: Task, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[str, dict[float, list[float]]] = {}
    fam: dict[str, tuple[str, str]] = {}
    for r in rows:
        by.setdefault(r["method"], {}).setdefault(r["lr"], []).append(r["metric"])
        fam[r["method"]] = (r["family"], r["scale"])
    # A second, narrower panel for the methods that sweep a multiplier, when there are any.
    two = any(scale == "multiplier" for _, scale in fam.values()) and any(s == "lr" for _, s in fam.values())
    fig, axes = (
        plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 1]})
        if two
        else plt.subplots(1, 1, figsize=(9, 5))
    )
    axes = list(axes) if two else [axes, axes]
    for name, per_lr in by.items():
        lrs = sorted(per_lr)
        means = [sum(per_lr[lr]) / len(per_lr[lr]) for lr in lrs]
        errs = [_std(per_lr[lr]) for lr in lrs]
        ax = axes[1] if fam[name][1] == "multiplier" else axes[0]
        style = "--" if not name.startswith("hyper") else "-"
        ax.errorbar(lrs, means, yerr=errs, label=fam[name][0], marker="o", linestyle=style, capsize=2)
    axes[0].set_xlabel("initial learning rate")
    if two:
        axes[1].set_xlabel("step-size multiplier (natural value 1)")
    for ax in dict.fromkeys(axes):
        ax.set_xscale("log")
        ax.set_ylabel(task.metric)
        if not task.higher:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{task.name}: final {task.metric} after {task.steps} steps (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    # The same plot zoomed on the top 5% (accuracy), where the methods that need no tuning differ.
    if task.higher:
        top = max(max(sum(v) / len(v) for v in per_lr.values()) for per_lr in by.values())
        for ax in dict.fromkeys(axes):
            ax.set_ylim(top * 0.95, top * 1.005)
            ax.axhline(top * 0.99, color="grey", linewidth=0.8, linestyle=":")
        fig.suptitle(f"{task.name}: zoom on the top 5% (dotted: 1% below the best)")
        fig.savefig(path.with_name(path.stem + "_zoom.png"), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------


# What each --task builds; a builder that takes ``steps`` trains for --steps (minilm, minilm_demo and the
# gpt2 tasks), the others for --epochs.
TASK_BUILDERS = {"digits": digits_task, "minilm": minilm_task, "minilm_demo": minilm_demo_task, "gpt2": gpt2_task,
                 "cancer": cancer_task, "diabetes": diabetes_task, "vit_digits": vit_digits_task,
                 # four times the parameters per layer and twice the layers: a size the defaults were not chosen at
                 "gpt2_128x4": partial(gpt2_task, width=128, layers=4),
                 "gpt2_finetune": gpt2_finetune_task, "stream": stream_task}  # fmt: skip
# --quick: a few steps, a small test set where the task has its own
QUICK = {
    "minilm": {"steps": 3, "n_test": 32},
    "gpt2": {"steps": 3, "n_test": 8},
    "gpt2_128x4": {"steps": 3, "n_test": 8},
    "gpt2_finetune": {"steps": 3, "n_test": 8, "pretrain_steps": 3},
    "vit_digits": {"epochs": 1},
    "stream": {"steps": 20, "n_test": 64},
}
QUICK["minilm_demo"] = QUICK["minilm"]  # the same model and data


@dataclass
class SensitivityArguments:
    task: str = field(
        default="digits",
        metadata={"help": "what to train", "choices": list(TASK_BUILDERS)},
    )
    methods: list[str] = field(
        default_factory=lambda: ["all"],
        metadata={
            "help": f"method names, or a set: {', '.join(METHOD_SETS)}; 'tower:<spec>' runs the levels of <spec> "
            "above Adam on the weights (--rename cannot rename runs to such a name)"
        },
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "model-init and data-order seeds"})
    lrs: list[float] = field(
        default_factory=lambda: [10.0**k for k in range(-7, 0)], metadata={"help": "initial learning rates"}
    )
    multipliers: list[float] = field(
        default_factory=lambda: [10.0**k for k in range(-3, 4)],
        metadata={"help": "step-size multipliers for Prodigy and D-Adaptation"},
    )
    epochs: int = field(
        default=200,
        metadata={
            "help": "digits, cancer, diabetes, vit_digits: epochs (6, 7, 11 and 22 steps each at batch 256, 64, 32 "
            "and 64)"
        },
    )
    steps: int = field(
        default=150,
        metadata={
            "help": "minilm / minilm_demo / gpt2 / gpt2_128x4 / gpt2_finetune / stream: training steps (the demo: 450)"
        },
    )
    batch_size: int | None = field(
        default=None,
        metadata={"help": "batch size (default: the task's: digits 256, vit_digits 64, cancer 64, diabetes 32, "
                  "minilm 16, minilm_demo 16, gpt2 16, gpt2_128x4 16, gpt2_finetune 16, stream 64)"},
    )  # fmt: skip
    sampling: str = field(
        default="epochs",
        metadata={
            "help": "how batches are drawn from a finite training set: epochs (each example once an epoch, as the "
            "Trainer does) or iid (with replacement)",
            "choices": list(SAMPLINGS),
        },
    )
    out: str = field(default="results", metadata={"help": "output folder"})
    tag: str = field(default="", metadata={"help": "suffix of the output files"})
    quick: bool = field(default=False, metadata={"help": "tiny settings (seconds): a smoke test of the pipeline"})
    threads: int = field(default=1, metadata={"help": "torch threads"})
    replot: str = field(default="", metadata={"help": "redraw the table and plot of a results JSON; train nothing"})
    merge: list[str] = field(
        default_factory=list,
        metadata={
            "help": "results JSONs of one task (runs of other methods or seeds) to write as one sweep "
            "to <out>/sensitivity_<task>[_<tag>].*; train nothing"
        },
    )
    drop: list[str] = field(
        default_factory=list,
        metadata={"help": "with --merge: leave out the runs of these methods (superseded by a later run)"},
    )
    rename: list[str] = field(
        default_factory=list,
        metadata={
            "help": "with --merge: OLD=NEW renames method OLD's runs to the registered method NEW (a default "
            "that has since changed keeps its rows under the name it has now)"
        },
    )


def batch_size_of(task: str, given: int | None) -> int:
    """The batch size a run of ``task`` used: ``given``, or the task's own (a results file made before
    ``--batch_size`` existed records none)."""
    return given if given is not None else inspect.signature(TASK_BUILDERS[task]).parameters["batch_size"].default


def make_task(args: SensitivityArguments) -> Task:
    if args.task not in TASK_BUILDERS:
        raise ValueError(f"--task {args.task!r} is not one of {', '.join(TASK_BUILDERS)}")
    tasks.check_sampling(args.sampling)
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch_size {args.batch_size}: give a positive number of examples")
    takes_steps = "steps" in inspect.signature(TASK_BUILDERS[args.task]).parameters
    kwargs = {"steps": args.steps} if takes_steps else {"epochs": args.epochs}
    if args.quick:
        kwargs |= QUICK.get(args.task, {"epochs": 2})
    if args.batch_size is not None:
        kwargs["batch_size"] = args.batch_size
    task = TASK_BUILDERS[args.task](**kwargs)
    if task.steps_per_epoch is None and args.sampling != "epochs":
        raise ValueError(f"--sampling {args.sampling}: the {task.name} task draws fresh examples, it has no epochs")
    return task


# ``tower:<spec>`` runs Adam on the weights under any upper levels, so that a screen needs no registered name;
# ``tower+linear:<spec>`` the same with HF's linear decay (no warm-up) multiplying the learned lr.
TOWER_PREFIX = "tower:"
LINEAR_TOWER_PREFIX = "tower+linear:"


def _linear_tower_method(name: str, spec: str) -> Method:
    """:func:`_tower_method`'s tower, its learned lr multiplied by HF's linear decay."""
    plain = _tower_method(name, spec)

    def build(params, lr, steps):
        from transformers import get_linear_schedule_with_warmup

        opt, _ = plain.build(params, lr, steps)
        return opt, get_linear_schedule_with_warmup(opt, 0, steps)

    return Method(name, f"{plain.family}, linear decay", build)


def resolve_methods(names: list[str]) -> list[Method]:
    registry = methods_registry()
    out: list[Method] = []
    for n in names:
        for m in METHOD_SETS.get(n, [n]):
            if m.startswith((TOWER_PREFIX, LINEAR_TOWER_PREFIX)) and m not in registry:
                if m.startswith(TOWER_PREFIX):
                    registry[m] = _tower_method(m, m[len(TOWER_PREFIX) :])
                else:
                    registry[m] = _linear_tower_method(m, m[len(LINEAR_TOWER_PREFIX) :])
                # Built once on a dummy weight: a bad spec, or levels that do not fit together, is refused
                # here (numbered as in the run: level 1 is the first above the weights), before any data loads.
                registry[m].build([torch.nn.Parameter(torch.zeros(1))], 1e-3, 1)
            if m not in registry:
                raise ValueError(
                    f"unknown method {m!r}; allowed: {', '.join([*METHOD_SETS, *registry])}, or "
                    f"{TOWER_PREFIX}<spec> for any levels above Adam on the weights"
                )
            if registry[m] not in out:
                out.append(registry[m])
    return out


def replot(json_path: Path) -> None:
    """Rewrite a sweep's table, plot and CSVs from ``<stem>.json`` (after a change to the table or the plot)."""
    data = json.loads(json_path.read_text())
    meta, rows = data["meta"], data["runs"]
    task = Task(meta["task"], meta["metric"], meta["higher_is_better"], meta["steps"], *([None] * 4), 0.0)
    write_results(rows, task, meta, json_path.parent, json_path.stem)


def merge(
    paths: list[Path], out: Path, tag: str, drop: list[str] | None = None, rename: list[str] | None = None
) -> list[dict]:
    """Write the runs of several results JSONs of one task as one sweep (table, plot, CSVs, JSON).

    A (method, learning rate, seed) run present in more than one file is an error: which to keep is
    the caller's decision, not this function's: ``drop`` names methods whose runs are left out, and
    ``rename`` (``OLD=NEW``) gives method OLD's runs the name and label of the registered method NEW, or of
    ``tower:<spec>`` (a default renamed after its spec once it is no longer the default).
    """
    registry = methods_registry()
    renames: dict[str, str] = {}
    for pair in rename or ():
        # Names may hold '=' themselves (hyper_adam(ramp_search=0)): NEW is the registered name after one.
        splits = [(pair[:i], pair[i + 1 :]) for i, ch in enumerate(pair) if ch == "=" and i > 0]
        towers = [(old, new) for old, new in splits if new.startswith(TOWER_PREFIX)]
        found = [(old, new) for old, new in splits if new in registry] or towers[:1]
        if not found:
            raise ValueError(
                f"--rename {pair!r}: give OLD=NEW with NEW one of {', '.join(registry)}, or {TOWER_PREFIX}<spec>"
            )
        old, new = found[0]
        if new not in registry:
            registry[new] = resolve_methods([new])[0]
        renames[old] = new
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--merge: no such results file: {', '.join(missing)} (give sensitivity_*.json files)")
    files = [json.loads(p.read_text()) for p in paths]
    metas = [f["meta"] for f in files]
    keys = {
        (
            m["task"],
            m["metric"],
            m["higher_is_better"],
            m["steps"],
            batch_size_of(m["task"], m.get("batch_size")),
            m.get("sampling", "epochs"),  # files made before --sampling drew epochs
        )
        for m in metas
    }
    if len(keys) != 1:
        raise ValueError(
            "--merge: the files are not runs of one task setting (task, metric, steps, batch size, sampling): "
            f"{sorted(keys, key=str)}"
        )
    dropped = set(drop or ())
    for f in files:
        for r in f["runs"]:
            if r["method"] in renames:
                new = registry[renames[r["method"]]]
                if new.name.startswith(TOWER_PREFIX) and " adam/" not in r["family"]:
                    # tower:<spec> runs Adam on the weights: it cannot name runs of another algorithm.
                    raise ValueError(
                        f"--rename: {new.name} is Adam on the weights, {r['method']!r} ran {r['family']!r}"
                    )
                r["method"], r["family"] = new.name, new.family
    rows = [r for f in files for r in f["runs"] if r["method"] not in dropped]
    seen: dict[tuple, str] = {}
    for path, f in zip(paths, files, strict=True):
        for r in (r for r in f["runs"] if r["method"] not in dropped):
            key = (r["method"], r["lr"], r["seed"])
            if key in seen:
                raise ValueError(f"--merge: run {key} is in both {seen[key]} and {path}")
            seen[key] = str(path)
    # What describes one run (its default, a note on it) stays with that file's entry in merged_from.
    meta = {k: v for k, v in metas[0].items() if k not in ("args", "default_hyper", "note")}
    sources = [
        {"file": str(p), **{k: m[k] for k in ("command", "commit", "default_hyper", "note") if k in m}}
        for p, m in zip(paths, metas, strict=True)
    ]
    meta |= {"merged_from": sources, "dropped_methods": sorted(dropped), "renamed_methods": renames}
    meta |= {"command": " ".join(sys.argv), "commit": ", ".join(dict.fromkeys(m.get("commit", "?") for m in metas))}
    task = Task(meta["task"], meta["metric"], meta["higher_is_better"], meta["steps"], *([None] * 4), 0.0)
    write_results(rows, task, meta, out, f"sensitivity_{task.name}{'_' + tag if tag else ''}")
    return rows


def write_results(rows: list[dict], task: Task, meta: dict, out: Path, stem: str) -> str:
    """``<stem>.csv`` (runs), ``<stem>_summary.csv``, ``<stem>.json``, ``<stem>.md`` (table) and ``<stem>.png``."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows, task.higher)
    _write_csv(out / f"{stem}.csv", rows)
    _write_csv(out / f"{stem}_summary.csv", summary)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=1))
    table = markdown_table(summary, task.metric)
    (out / f"{stem}.md").write_text(table)
    plot(rows, task, out / f"{stem}.png")
    return table


def main(args: SensitivityArguments) -> list[dict]:
    if args.replot:
        replot(Path(args.replot))
        return []
    if args.merge:
        return merge([Path(p) for p in args.merge], Path(args.out), args.tag, args.drop, args.rename)
    methods = resolve_methods(args.methods)  # raises on a bad name before any work
    commit = git_commit()  # the code as it was loaded: later commits during a long sweep are not its
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        args.lrs, args.multipliers, args.seeds = [1e-4, 1e-2], [0.1, 1.0], args.seeds[:1]
    with tasks.drawn(args.sampling):  # the streams the sweep makes; a later caller draws as it did
        return _sweep(args, methods, commit)


def _sweep(args: SensitivityArguments, methods: list[Method], commit: str) -> list[dict]:
    """Train every method at every point of its grid with every seed; write and return the runs."""
    task = make_task(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sensitivity_{task.name}{'_' + args.tag if args.tag else ''}"
    rows: list[dict] = []
    for method in methods:
        if method.reference and not task.reference_applies:
            print(f"{method.name}: skipped, the reference implementation cannot train the {task.name} model")
            continue
        grid = args.multipliers if method.scale == "multiplier" else args.lrs
        for lr in grid:
            for seed in args.seeds:
                r = run_one(task, method, lr, seed)
                rows.append(
                    {
                        "task": task.name,
                        "method": method.name,
                        "family": method.family,
                        "scale": method.scale,
                        "lr": lr,
                        "seed": seed,
                        **r,
                    }
                )
                print(
                    f"{method.name:38s} lr={lr:<8g} seed={seed} {task.metric}={r['metric']:.2f} "
                    f"diverged={r['diverged']} final_lr={r['final_lr']:.3g} ({r['seconds']:.1f}s)",
                    flush=True,
                )
    meta = {"task": task.name, "metric": task.metric, "higher_is_better": task.higher, "steps": task.steps}
    meta["batch_size"] = batch_size_of(args.task, args.batch_size)
    meta["sampling"] = args.sampling
    meta |= {"default_hyper": hh.DEFAULT_HYPER["default"], "args": asdict(args), "command": " ".join(sys.argv)}
    meta |= {"torch": torch.__version__, "commit": commit, "hf_hyperopt": str(Path(hh.__file__).parent)}
    print(write_results(rows, task, meta, out, stem))
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    # Every run's columns (files written before a column existed merge with later ones); a run's step-size
    # trajectory is a list, kept in the JSON only.
    fields = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "lr_trajectory"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def make_parser():
    from transformers import HfArgumentParser

    return HfArgumentParser(SensitivityArguments)


if __name__ == "__main__":
    (parsed,) = make_parser().parse_args_into_dataclasses()
    main(parsed)
