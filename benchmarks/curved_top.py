"""Does the curvature term make the top's step size matter less? (issue 10, item 2)

A stand-in for the default tower's upper level, outside the engine: AdamW on the weights, and ``log(lr)``
learned by Adam without momentum (``beta1 = 0``) with the step ``top * min(1, sqrt(100 / t))`` (the
default's ``timescale=100``) from the slope ``-<g_{t+1}, Z_t> / |Z_t|`` (the default's ``normalize=true``).
``Z_t`` is a trace of the updates with decay ``mu`` without the curvature term (what the engine carries),
or :class:`~benchmarks.curved_trace.CurvedTrace` with it (a Hessian-vector product a step). A trace that
overflows is started afresh (counted). The lr starts at ``--starts`` (the default's ramp starts the
small GPT-2 at about 5e-5), with no ramp or search. One run per (signal, top step, start, seed); the
test perplexity at the end, to set beside the best constant-lr AdamW of ``greedy_signal`` (same task,
seeds and batches)::

    python -m benchmarks.curved_top --seeds 0 1 2 --out results

About 15 s a run of the small GPT-2 without the curvature term and 45 s with it, on one core.
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
from .greedy_signal import LM_TASKS
from .provenance import git_commit
from .sensitivity import TASK_BUILDERS

TIMESCALE = 100


@dataclass
class CurvedTopArguments:
    task: str = field(default="gpt2", metadata={"help": "the model", "choices": list(LM_TASKS)})
    steps: int = field(default=300, metadata={"help": "training steps"})
    signals: list[str] = field(
        default_factory=lambda: ["trace:0.99", "curved:0.99"],
        metadata={"help": "trace:MU (no curvature term) or curved:MU (with it), MU in [0, 1]"},
    )
    tops: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1, 0.2], metadata={"help": "top step sizes"})
    starts: list[float] = field(default_factory=lambda: [5e-5], metadata={"help": "initial lrs"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "model and data-order seeds"})
    tag: str = field(default="", metadata={"help": "suffix of the output files' names"})
    out: str = field(default="results", metadata={"help": "output folder"})


def parse_signal(signal: str) -> tuple[bool, float]:
    """``trace:MU`` / ``curved:MU`` as (curved, mu); a clear error for anything else."""
    kind, _, mu_text = signal.partition(":")
    try:
        mu = float(mu_text)
    except ValueError:
        mu = math.nan
    if kind not in ("trace", "curved") or not 0 <= mu <= 1:
        raise ValueError(f"signal {signal!r}: give trace:MU or curved:MU with MU in [0, 1]")
    return kind == "curved", mu


def run(task: tasks.Task, curved: bool, mu: float, top: float, start: float, seed: int) -> dict:
    """Train with the learned lr; the test perplexity, the lr every 25 steps and at the end, and the traces
    started afresh."""
    model = task.build_model(seed)
    if curved:
        model.set_attn_implementation("eager")  # differentiable twice
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=start, weight_decay=0.0)
    batches = task.batches(seed)
    log_lr, v, top_steps, restarts = math.log(start), 0.0, 0, 0
    trace: CurvedTrace | None = None
    lrs = {}
    for t in range(task.steps):
        loss = task.loss(model, next(batches))
        if not torch.isfinite(loss):
            return {"perplexity": math.inf, "lrs": lrs, "restarts": restarts}
        grads = torch.autograd.grad(loss, params, create_graph=curved)
        g = flat(grads)
        hz = torch.zeros_like(g)
        if trace is not None and not torch.isfinite(trace.z).all():
            trace, restarts = None, restarts + 1
        if trace is not None:
            z_norm = trace.z.norm()
            slope = float(-(g @ trace.z) / z_norm) if z_norm > 0 else 0.0
            top_steps += 1
            v = 0.999 * v + 0.001 * slope**2
            step = top * min(1.0, math.sqrt(TIMESCALE / top_steps))
            log_lr += step * slope / (math.sqrt(v / (1 - 0.999**top_steps)) + 1e-12)
            opt.param_groups[0]["lr"] = math.exp(log_lr)
            if curved:
                hz = trace.hessian_times_z(grads, params)
        update = step_with(opt, params, grads)
        trace = trace or CurvedTrace(mu, g)
        if curved:
            trace.advance_adamw(opt, hz, g, update)
        else:
            trace.z = mu * trace.z + update
        if (t + 1) % 25 == 0:
            lrs[t + 1] = math.exp(log_lr)
    return {"perplexity": task.evaluate(model), "lrs": lrs, "final_lr": math.exp(log_lr), "restarts": restarts}


def main(args: CurvedTopArguments) -> dict:
    signals = {s: parse_signal(s) for s in args.signals}  # before any run
    if not all(x > 0 for x in [*args.tops, *args.starts]):
        raise ValueError("--tops and --starts: give positive numbers")
    if args.task not in LM_TASKS:
        raise ValueError(f"--task {args.task!r}: choose one of {', '.join(LM_TASKS)}")
    commit = git_commit()
    torch.set_num_threads(1)
    task = TASK_BUILDERS[args.task](args.steps)
    runs = []
    for signal, (curved, mu) in signals.items():
        for top in args.tops:
            for start in args.starts:
                for seed in args.seeds:
                    r = run(task, curved, mu, top, start, seed)
                    runs.append({"signal": signal, "top": top, "start": start, "seed": seed, **r})
                    print(f"{signal} top {top:g} start {start:g} seed {seed}: perplexity {r['perplexity']:.2f}, "
                          f"lr {', '.join(f'{x:.2g}' for x in r['lrs'].values())}", file=sys.stderr)  # fmt: skip
    worst = {}
    for signal in signals:
        for top in args.tops:
            mean = [
                sum(r["perplexity"] for r in runs if (r["signal"], r["top"], r["start"]) == (signal, top, s))
                / len(args.seeds)
                for s in args.starts
            ]
            worst[signal, top] = max(mean)
    table = [
        f"`{args.task}`, {args.steps} steps, starts {' '.join(f'{s:g}' for s in args.starts)}, seeds "
        f"{' '.join(map(str, args.seeds))}: test perplexity, worst start (mean over the seeds):",
        "",
        "| signal | " + " | ".join(f"top {t:g}" for t in args.tops) + " |",
        "|---|" + "---|" * len(args.tops),
    ]
    for signal in signals:
        table.append(f"| {signal} | " + " | ".join(f"{worst[signal, t]:.2f}" for t in args.tops) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"curved_top_{args.task}" + (f"_{args.tag}" if args.tag else ""))
    stem.with_suffix(".md").write_text("\n".join(table) + "\n")
    meta = {"args": asdict(args), "command": " ".join(sys.argv), "commit": commit, "torch": torch.__version__}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs}))
    print("\n".join(table))
    return {f"{s}/{t:g}": w for (s, t), w in worst.items()}


if __name__ == "__main__":
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(CurvedTopArguments).parse_args_into_dataclasses()
    main(parsed)
