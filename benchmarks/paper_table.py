"""The paper's Table 1 (MNIST MLP) on scikit-learn's digits: hf_hyperopt beside the reference implementation.

Each stack of Chandra et al. (2022), Table 1, trains the paper's MLP (one hidden layer of 128 tanh
units, batch 256) twice from the same seed and the same batch order: once with the paper's own code
(``gradient_descent_the_ultimate_optimizer.gdtuo``, ``ModuleWrapper`` and ``backward(create_graph=True)``)
and once with ``hf_hyperopt.tower(..., compat="gdtuo")`` in an ordinary loop. The two must agree:
the table reports both test errors and the largest difference between their final weights and
learned step sizes. Rows marked ``default`` run hf_hyperopt's default mode (log step size, the
default upper level ``DEFAULT_HYPER["default"]``) on the same base optimizers.

MNIST cannot be downloaded here; digits (1,797 8x8 images, 1,347 train / 450 test) ships with
scikit-learn. The paper trains the SGD and AdaGrad stacks 6x longer than the Adam and RMSProp stacks
(30 vs 5 MNIST epochs, ~7,000 vs ~1,170 steps); here the Adam and RMSProp stacks take the paper's
~1,200 steps (200 digits epochs of 6 steps) and the SGD and AdaGrad stacks 2x that, to keep the run short.

Commands (from the repository root; writes ``<out>/paper_table.{csv,json,md}``)::

    nice python -m benchmarks.paper_table --seeds 0 1 2          # ~30 min on one busy CPU core
    python -m benchmarks.paper_table --quick --out /tmp/paper    # seconds (what tests/test_evidence.py runs)
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import hf_hyperopt as hh

from .provenance import git_commit
from .tasks import Task, digits_task


@dataclass(frozen=True)
class Stack:
    """One row of the paper's table: its label, the spec string, and the reference's constructor."""

    label: str
    spec: str
    family: str  # "sgd" (long budget) or "adam" (short budget), as in the paper
    paper_error: str


def _ref(spec: str):
    """The reference stack for a spec, built from the paper's classes with the same initial values."""
    from gradient_descent_the_ultimate_optimizer import gdtuo

    levels = [lvl.strip() for lvl in spec.split("/")]
    opt = gdtuo.NoOpOptimizer()
    for level in reversed(levels):
        name, _, body = level.partition("(")
        kw = dict(item.split("=") for item in body.rstrip(")").split(",") if item)
        lr = float(kw["lr"])
        if name == "sgd":
            opt = gdtuo.SGD(alpha=lr, optimizer=opt)
        elif name == "adagrad":
            opt = gdtuo.AdaGrad(alpha=lr, optimizer=opt)
        elif name == "rmsprop":
            opt = gdtuo.RMSProp(alpha=lr, optimizer=opt)
        elif name == "adam" and kw.get("learn") == "lr":
            opt = gdtuo.AdamBaydin(alpha=lr, optimizer=opt)
        elif name == "adam":
            opt = gdtuo.Adam(alpha=lr, optimizer=opt)
        else:
            raise ValueError(f"level {level!r} has no reference counterpart")
    return opt


STACKS: list[Stack] = [
    Stack("SGD", "sgd(lr=0.01)", "sgd", "8.99 ± 0.05"),
    Stack("SGD / SGD", "sgd(lr=0.01)/sgd(lr=0.01)", "sgd", "4.81 ± 0.10"),
    Stack("SGD / Adam(0.1)", "sgd(lr=0.01)/adam(lr=0.1)", "sgd", "4.86 ± 0.06"),
    Stack("SGD / AdaGrad", "sgd(lr=0.01)/adagrad(lr=0.01)", "sgd", "4.85 ± 0.21"),
    Stack("SGD / RMSprop(0.1)", "sgd(lr=0.01)/rmsprop(lr=0.1)", "sgd", "4.52 ± 0.02"),
    Stack("AdaGrad", "adagrad(lr=0.01)", "sgd", "7.40 ± 0.08"),
    Stack("AdaGrad / SGD", "adagrad(lr=0.01)/sgd(lr=0.01)", "sgd", "6.90 ± 0.16"),
    Stack("AdaGrad / AdaGrad", "adagrad(lr=0.01)/adagrad(lr=0.01)", "sgd", "5.03 ± 0.23"),
    Stack("Adam", "adam(lr=0.001)", "adam", "4.67 ± 0.06"),
    Stack("Adam / SGD(1e-5)", "adam(lr=0.001)/sgd(lr=1e-05)", "adam", "3.03 ± 0.02"),
    Stack("Adam^alpha / SGD(1e-5)", "adam(lr=0.001,learn=lr)/sgd(lr=1e-05)", "adam", "3.12 ± 0.04"),
    Stack("Adam / Adam", "adam(lr=0.001)/adam(lr=0.001)", "adam", "3.05 ± 0.09"),
    Stack("Adam^alpha / Adam", "adam(lr=0.001,learn=lr)/adam(lr=0.001)", "adam", "3.04 ± 0.08"),
    Stack("RMSProp", "rmsprop(lr=0.01)", "adam", "4.19 ± 0.47"),
    Stack("RMSProp^alpha,gamma / SGD(1e-4)", "rmsprop(lr=0.01)/sgd(lr=0.0001)", "adam", "3.33 ± 0.07"),
    Stack("RMSProp^alpha,gamma / RMSProp(1e-4)", "rmsprop(lr=0.01)/rmsprop(lr=0.0001)", "adam", "2.96 ± 0.11"),
]

# hf_hyperopt's default mode on the same base optimizers: the default upper level, nothing else tuned.
DEFAULT_MODE_BASES: list[tuple[str, str, str]] = [
    ("SGD", "sgd(lr=0.01)", "sgd"),
    ("AdaGrad", "adagrad(lr=0.01)", "sgd"),
    ("Adam", "adam(lr=0.001)", "adam"),
    ("RMSProp", "rmsprop(lr=0.01)", "adam"),
]


def run_hf(task: Task, spec: str, seed: int, compat: str | None) -> tuple[float, list[torch.Tensor], float, float]:
    model = task.build_model(seed)
    opt = hh.tower(model.parameters(), spec, compat=compat)
    opt.set_horizon(task.horizon)  # as the Trainer does, for a level with trace=auto (others ignore it)
    batches = task.batches(seed)
    t0 = time.perf_counter()
    for _ in range(task.steps):
        loss = task.loss(model, next(batches))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    lr = opt.hyperparameters()[0]["lr"]
    weights = [p.detach().clone() for p in model.parameters()]
    return task.evaluate(model), weights, float(lr if isinstance(lr, float) else lr[0]), seconds


def run_reference(task: Task, spec: str, seed: int) -> tuple[float, list[torch.Tensor], float, float]:
    from gradient_descent_the_ultimate_optimizer import gdtuo

    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    model = task.build_model(seed)
    mw = gdtuo.ModuleWrapper(model, optimizer=_ref(spec))
    mw.initialize()
    batches = task.batches(seed)
    t0 = time.perf_counter()
    for _ in range(task.steps):
        mw.begin()
        mw.zero_grad()
        loss = task.loss(mw.module, next(batches))
        loss.backward(create_graph=True)
        mw.step()
    seconds = time.perf_counter() - t0
    alpha = mw.optimizer.parameters["alpha"].detach()
    if isinstance(mw.optimizer, gdtuo.RMSProp):
        alpha = alpha.square()  # the reference stores sqrt(alpha) for RMSProp
    weights = [p.detach().clone() for p in mw.parameters.values()]
    return task.evaluate(model), weights, float(alpha), seconds


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


@dataclass
class PaperTableArguments:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "model-init and data-order seeds"})
    epochs_sgd: int = field(default=400, metadata={"help": "epochs for SGD and AdaGrad stacks (6 steps each)"})
    epochs_adam: int = field(default=200, metadata={"help": "epochs for Adam and RMSProp stacks"})
    stacks: list[str] = field(default_factory=list, metadata={"help": "labels of the rows to run (default: all)"})
    skip_stacks: bool = field(default=False, metadata={"help": "run none of the paper's stacks"})
    default_mode: bool = field(default=True, metadata={"help": "also run the base optimizers in the default mode"})
    out: str = field(default="results", metadata={"help": "output folder"})
    tag: str = field(default="", metadata={"help": "suffix of the output files"})
    quick: bool = field(default=False, metadata={"help": "2 epochs, 1 seed: a smoke test of the pipeline"})
    threads: int = field(default=1, metadata={"help": "torch threads"})


def main(args: PaperTableArguments) -> list[dict]:
    stacks = STACKS if not args.stacks else [s for s in STACKS if s.label in args.stacks]
    stacks = [] if args.skip_stacks else stacks
    unknown = set(args.stacks) - {s.label for s in STACKS}
    if unknown:
        raise ValueError(f"unknown stack(s) {sorted(unknown)}; allowed: {[s.label for s in STACKS]}")
    commit = git_commit()  # the code as it was loaded: later commits during a long run are not its
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        args.seeds, args.epochs_sgd, args.epochs_adam = args.seeds[:1], 2, 2
        stacks = [s for s in stacks if s.label in ("SGD / SGD", "Adam / SGD(1e-5)", "RMSProp^alpha,gamma / SGD(1e-4)")]
    tasks = {"sgd": digits_task(epochs=args.epochs_sgd), "adam": digits_task(epochs=args.epochs_adam)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    runs: list[dict] = []
    rows: list[dict] = []
    for st in stacks:
        task = tasks[st.family]
        ref_err, hf_err, dw, dlr, ref_lr, hf_lr, t_ref, t_hf = [], [], [], [], [], [], [], []
        for seed in args.seeds:
            a_acc, a_w, a_lr, a_t = run_reference(task, st.spec, seed)
            b_acc, b_w, b_lr, b_t = run_hf(task, st.spec, seed, compat="gdtuo")
            diff = max((x - y).abs().max().item() for x, y in zip(a_w, b_w, strict=True))
            ref_err.append(100.0 - a_acc)
            hf_err.append(100.0 - b_acc)
            dw.append(diff)
            dlr.append(abs(a_lr - b_lr) / max(abs(a_lr), 1e-30))
            ref_lr.append(a_lr)
            hf_lr.append(b_lr)
            t_ref.append(a_t)
            t_hf.append(b_t)
            runs.append(
                {"stack": st.label, "spec": st.spec, "mode": "gdtuo", "seed": seed, "steps": task.steps,
                 "ref_error": 100.0 - a_acc, "hf_error": 100.0 - b_acc, "max_weight_diff": diff,
                 "ref_lr": a_lr, "hf_lr": b_lr, "ref_seconds": a_t, "hf_seconds": b_t}
            )  # fmt: skip
            print(f"{st.label:38s} seed={seed} ref={100 - a_acc:.2f}% hf={100 - b_acc:.2f}% max|dw|={diff:.2e} "
                  f"lr ref={a_lr:.4g} hf={b_lr:.4g} ({a_t:.1f}s / {b_t:.1f}s)", flush=True)  # fmt: skip
        rm, rs = _mean_std(ref_err)
        hm, hs = _mean_std(hf_err)
        rows.append(
            {"stack": st.label, "spec": st.spec, "mode": "gdtuo", "steps": task.steps, "paper_mnist_error": st.paper_error,
             "ref_error_mean": rm, "ref_error_std": rs, "hf_error_mean": hm, "hf_error_std": hs,
             "max_weight_diff": max(dw), "max_lr_rel_diff": max(dlr), "ref_lr_mean": sum(ref_lr) / len(ref_lr),
             "hf_lr_mean": sum(hf_lr) / len(hf_lr), "ref_seconds": sum(t_ref), "hf_seconds": sum(t_hf)}
        )  # fmt: skip

    bases = DEFAULT_MODE_BASES if args.default_mode else []
    if args.quick and args.default_mode:
        bases = [("Adam", "adam(lr=0.001)", "adam")]
    for label, base, family in bases:
        task = tasks[family]
        spec = f"{base}/{hh.DEFAULT_HYPER['default']}"
        errs, lrs = [], []
        for seed in args.seeds:
            acc, _, lr, t = run_hf(task, spec, seed, compat=None)
            errs.append(100.0 - acc)
            lrs.append(lr)
            runs.append({"stack": f"{label} / default", "spec": spec, "mode": "default", "seed": seed, "steps": task.steps,
                         "hf_error": 100.0 - acc, "hf_lr": lr, "hf_seconds": t})  # fmt: skip
            print(f"{label + ' / default':38s} seed={seed} hf={100 - acc:.2f}% lr={lr:.4g} ({t:.1f}s)", flush=True)
        hm, hs = _mean_std(errs)
        rows.append({"stack": f"{label} / {hh.DEFAULT_HYPER['default']} (default mode)", "spec": spec, "mode": "default",
                     "steps": task.steps, "paper_mnist_error": "", "hf_error_mean": hm, "hf_error_std": hs,
                     "hf_lr_mean": sum(lrs) / len(lrs)})  # fmt: skip

    _write(out / f"paper_table{'_' + args.tag if args.tag else ''}", rows, runs, args, commit)
    return rows


def markdown(rows: list[dict], n_seeds: int) -> str:
    lines = [
        "| stack | steps | paper (MNIST) test error % | reference gdtuo, digits test error % | hf_hyperopt, digits test error % "
        "| max abs weight diff | max rel. diff of final lr | final lr |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["mode"] == "gdtuo":
            lines.append(
                f"| {r['stack']} | {r['steps']} | {r['paper_mnist_error']} | {r['ref_error_mean']:.2f} ± {r['ref_error_std']:.2f} "
                f"| {r['hf_error_mean']:.2f} ± {r['hf_error_std']:.2f} | {r['max_weight_diff']:.1e} | {r['max_lr_rel_diff']:.1e} "
                f"| {r['hf_lr_mean']:.3g} |"
            )
        else:
            lines.append(
                f"| {r['stack']} | {r['steps']} | | | {r['hf_error_mean']:.2f} ± {r['hf_error_std']:.2f} | | | {r['hf_lr_mean']:.3g} |"
            )
    return (
        "\n".join(lines)
        + f"\n\nMean ± std over {n_seeds} seed(s); the same seeds and batch order for both implementations.\n"
    )


def _write(stem: Path, rows: list[dict], runs: list[dict], args: PaperTableArguments, commit: str) -> None:
    import csv

    keys = list(dict.fromkeys(k for r in rows for k in r))
    with stem.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    meta = {"default_hyper": hh.DEFAULT_HYPER["default"], "args": asdict(args), "command": " ".join(sys.argv)}
    meta |= {"torch": torch.__version__, "commit": commit, "hf_hyperopt": str(Path(hh.__file__).parent)}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=1))
    table = markdown(rows, len(args.seeds))
    stem.with_suffix(".md").write_text(table)
    print(table)


def make_parser():
    from transformers import HfArgumentParser

    return HfArgumentParser(PaperTableArguments)


if __name__ == "__main__":
    (parsed,) = make_parser().parse_args_into_dataclasses()
    main(parsed)
