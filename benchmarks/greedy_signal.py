"""Where the lr's hypergradient stops asking for more, against the lr that ends best (issue 10, item 2).

A top level whose step size does not matter drives the learned lr to where its signal is zero on average.
This measures where that is, without any tower: AdamW (as the sensitivity sweep's ``adamw``) on a language
model of the sweep over a grid of constant lrs, recording at every step the pull of the next batch's
gradient along a trace of the updates, ``pull_mu = -cos(g_{t+1}, Z_t)`` with
``Z_t = mu Z_{t-1} + (w_{t+1} - w_t)``: positive asks for a larger lr. ``mu = 0`` is the one-step
hypergradient's sign (the default's signal), ``0.9`` and ``0.99`` the tangent traces of ``trace=``
(without the curvature term), ``1`` the displacement from the start, ``<g, w_t - w_0>`` (the signal of
Mechanic, Prodigy and DoG). Beside them each lr's test perplexity at the end: a signal suits a step-free
top if it turns negative above the best lr.

A plan may also change its lr: ``1e-2@50,2e-3`` holds 1e-2 for the first 50 steps and 2e-3 after, which
measures what following the signal early does to the end.

    python -m benchmarks.greedy_signal --seeds 0 1 2 --out results
    python -m benchmarks.greedy_signal --seeds 0 1 2 --plans 2e-3 1e-2@30,2e-3 1e-2@50,2e-3 --tag early --out results

``--task`` is ``gpt2`` (the small GPT-2 from scratch), ``gpt2_128x4`` (a larger one) or ``gpt2_finetune``
(the small one, pretrained). Writes ``<out>/greedy_signal_<task>[_<tag>].md`` (the mean pull per window
of the run, over the seeds) and ``.json`` (also every step's pulls). About 15 s a run of the small GPT-2
on one core.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import tasks
from .curved_trace import CurvedTrace, flat, step_with
from .provenance import git_commit
from .sensitivity import TASK_BUILDERS

TRACES = (0.0, 0.9, 0.99, 1.0)


# The language models of the sensitivity sweep (built by its TASK_BUILDERS): their metric is a perplexity.
LM_TASKS = ("gpt2", "gpt2_128x4", "gpt2_finetune")


@dataclass
class GreedySignalArguments:
    task: str = field(default="gpt2", metadata={"help": "the model", "choices": list(LM_TASKS)})
    steps: int = field(default=300, metadata={"help": "training steps"})
    plans: list[str] = field(
        default_factory=lambda: ["5e-4", "1e-3", "2e-3", "4e-3", "8e-3", "1.6e-2", "3.2e-2"],
        metadata={"help": "AdamW's lr: a constant, or LR@STEPS,...,LR (each lr until its step, then the next)"},
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "model and data-order seeds"})
    windows: int = field(default=6, metadata={"help": "windows of the run, one column each"})
    curved: list[float] = field(
        default_factory=list,
        metadata={"help": "decays mu of traces with the curvature term (a Hessian-vector product a step each)"},
    )
    eval_at: list[int] = field(
        default_factory=list,
        metadata={"help": "steps before the end at which the test perplexity is also measured (a shorter run's end)"},
    )
    tag: str = field(default="", metadata={"help": "suffix of the output files' names"})
    out: str = field(default="results", metadata={"help": "output folder"})


def parse_plan(plan: str, steps: int) -> list[tuple[int, float]]:
    """``LR@STEPS,...,LR`` as (first step, lr) pairs; a clear error for anything else."""
    pieces, start = [], 0
    parts = plan.split(",")
    for i, part in enumerate(parts):
        lr_text, _, until = part.partition("@")
        try:
            lr = float(lr_text)
            end = int(until) if until else None
        except ValueError:
            lr, end = math.nan, None
        last = i == len(parts) - 1
        if not (math.isfinite(lr) and lr > 0) or (end is None) != last or (end is not None and not start < end < steps):
            raise ValueError(
                f"plan {plan!r}: give LR or LR@STEPS,...,LR with lrs > 0 and steps increasing within the run's {steps}"
            )
        pieces.append((start, lr))
        start = end if end is not None else start
    return pieces


def record(
    task: tasks.Task,
    plan: list[tuple[int, float]],
    seed: int,
    eval_at: tuple[int, ...] = (),
    curved: tuple[float, ...] = (),
) -> tuple[list[list[float]], float, dict[int, float]]:
    """Every step's pull for each trace of ``TRACES`` and then of ``curved`` (:class:`CurvedTrace`, from the
    second step on), the test perplexity, and the test perplexity after each step count of ``eval_at``.
    Evaluating draws no random numbers (no dropout), so the run goes on as without it: a constant lr's
    perplexity at step s is that of an s-step run."""
    model = task.build_model(seed)
    if curved:  # a Hessian-vector product a step: differentiate the backward pass
        model.set_attn_implementation("eager")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=plan[0][1], weight_decay=0.0)
    batches = task.batches(seed)
    traces: list[torch.Tensor] | None = None
    curves: list[CurvedTrace] = []
    pulls: list[list[float]] = []
    midway: dict[int, float] = {}
    for t in range(task.steps):
        for start, lr in plan:
            if t == start:
                opt.param_groups[0]["lr"] = lr
        loss = task.loss(model, next(batches))
        if not torch.isfinite(loss):
            return pulls, math.inf, {**midway, **{s: math.inf for s in eval_at if s not in midway}}
        grads = torch.autograd.grad(loss, params, create_graph=bool(curved))
        g = flat(grads)
        if traces is not None:
            tiny = torch.finfo(g.dtype).tiny
            zs = [*traces, *(c.z for c in curves)]
            pulls.append([float(-(g @ z) / (g.norm() * z.norm()).clamp_min(tiny)) for z in zs])
        hvps = [c.hessian_times_z(grads, params) for c in curves]
        update = step_with(opt, params, grads)
        if traces is None:
            traces = [update.clone() for _ in TRACES]
            curves = [CurvedTrace(mu, g) for mu in curved]
            hvps = [torch.zeros_like(g) for _ in curved]
        else:
            traces = [mu * z + update for mu, z in zip(TRACES, traces, strict=True)]
        for c, hz in zip(curves, hvps, strict=True):
            c.advance_adamw(opt, hz, g, update)
        if t + 1 in eval_at:
            midway[t + 1] = task.evaluate(model)
    model.eval()
    return pulls, task.evaluate(model), midway


def main(args: GreedySignalArguments) -> dict:
    if args.steps < 2 * args.windows or args.windows < 1:
        raise ValueError(f"--steps {args.steps} --windows {args.windows}: give at least 2 steps a window")
    if args.task not in LM_TASKS:
        raise ValueError(f"--task {args.task!r}: choose one of {', '.join(LM_TASKS)}")
    plans = {plan: parse_plan(plan, args.steps) for plan in args.plans}  # before any run
    bad = [s for s in args.eval_at if not 0 < s < args.steps]
    if bad:
        raise ValueError(
            f"--eval_at {' '.join(map(str, bad))}: give steps between 1 and --steps - 1 ({args.steps - 1})"
        )
    eval_at = tuple(sorted(set(args.eval_at)))
    if not all(0 <= mu <= 1 for mu in args.curved):
        raise ValueError(f"--curved {' '.join(map(str, args.curved))}: give decays between 0 and 1")
    curved = tuple(args.curved)
    signals = [*TRACES, *curved]  # the pulls' columns
    names = [f"{mu:g}" for mu in TRACES] + [f"curved {mu:g}" for mu in curved]
    commit = git_commit()
    torch.set_num_threads(1)
    task = TASK_BUILDERS[args.task](args.steps)
    runs = []
    for plan, pieces in plans.items():
        for seed in args.seeds:
            pulls, perplexity, midway = record(task, pieces, seed, eval_at, curved)
            runs.append(
                {
                    "plan": plan,
                    "seed": seed,
                    "perplexity": perplexity,
                    "pulls": pulls,
                    "perplexity_at": {str(s): v for s, v in midway.items()},
                }
            )
            print(f"lr {plan} seed {seed}: perplexity {perplexity:.2f}", file=sys.stderr)
    width = args.steps // args.windows
    spans = [(lo, min(lo + width, args.steps)) for lo in range(0, args.steps - width + 1, width)]
    means = {}  # (plan, trace index, window) -> mean pull over the seeds' steps in it (the finite ones)
    overflowed = {}  # the same keys -> whether some of those steps' traces had overflowed
    for plan in plans:
        for i in range(len(signals)):
            for w, (lo, hi) in enumerate(spans):
                vals = [p[i] for r in runs if r["plan"] == plan for p in r["pulls"][max(lo - 1, 0) : hi - 1]]
                finite = [x for x in vals if math.isfinite(x)]  # a curved trace can overflow (chaotic steps)
                means[plan, i, w] = sum(finite) / len(finite) if finite else math.nan
                overflowed[plan, i, w] = len(finite) < len(vals)
    ppl = {plan: sum(r["perplexity"] for r in runs if r["plan"] == plan) / len(args.seeds) for plan in plans}
    header = "| lr | test perplexity | " + " | ".join(f"steps {lo}-{hi}" for lo, hi in spans) + " |"
    table = [
        f"`{args.task}`, AdamW, {args.steps} steps, seeds {' '.join(map(str, args.seeds))} (means); "
        "the mean pull -cos(g_{t+1}, Z_t) per window, positive asks for a larger lr (`*`: of the finite "
        "values, some seed's trace having overflowed; `overflow`: none finite):",
    ]
    for i, mu in enumerate(signals):
        name = "one step" if mu == 0 else ("displacement from the start" if mu == 1 else f"trace {mu:g}")
        if i >= len(TRACES):
            name = f"trace {mu:g} with the curvature term" + (
                " (the exact hypergradient of a constant lr)" if mu == 1 else ""
            )
        table += ["", f"`mu = {mu:g}` ({name}):", "", header, "|---|---|" + "---|" * len(spans)]
        for plan in plans:
            cells = " | ".join(
                "overflow"
                if math.isnan(means[plan, i, w])
                else f"{means[plan, i, w]:+.3f}" + "*" * overflowed[plan, i, w]
                for w in range(len(spans))
            )
            table.append(f"| {plan} | {ppl[plan]:.2f} | {cells} |")
    if eval_at:
        at = {
            (plan, s): sum(r["perplexity_at"][str(s)] for r in runs if r["plan"] == plan) / len(args.seeds)
            for plan in plans
            for s in eval_at
        }
        for plan in plans:
            at[plan, args.steps] = ppl[plan]
        ends = (*eval_at, args.steps)
        best = {s: min(plans, key=lambda plan: at[plan, s]) for s in ends}
        table += [
            "",
            "Test perplexity after each step count (means; bold: the best plan at that step):",
            "",
            "| lr | " + " | ".join(f"step {s}" for s in ends) + " |",
            "|---|" + "---|" * len(ends),
        ]
        for plan in plans:
            cells = " | ".join(f"**{at[plan, s]:.2f}**" if best[s] == plan else f"{at[plan, s]:.2f}" for s in ends)
            table.append(f"| {plan} | {cells} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"greedy_signal_{args.task}" + (f"_{args.tag}" if args.tag else ""))
    stem.with_suffix(".md").write_text("\n".join(table) + "\n")
    meta = {"args": asdict(args), "command": " ".join(sys.argv), "commit": commit, "torch": torch.__version__}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "traces": TRACES, "curved": curved, "runs": runs}))
    print("\n".join(table))
    return {"perplexity": ppl, "means": {f"{k[0]}/{names[k[1]]}/{k[2]}": v for k, v in means.items()}}


if __name__ == "__main__":
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(GreedySignalArguments).parse_args_into_dataclasses()
    main(parsed)
