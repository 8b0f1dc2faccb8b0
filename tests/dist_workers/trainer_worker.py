"""Train a tiny BERT with ``HyperTrainer`` and write the tower's hyperparameters after every step, per rank.

Launched by ``tests/test_distributed.py`` as one plain process (the reference) or under torchrun,
where Accelerate runs ``MULTI_CPU`` with gloo::

    python tests/dist_workers/trainer_worker.py --out ref --batch 8 --output-dir /tmp/a
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_workers/trainer_worker.py \
        --out ddp --batch 4 --wrap ddp --output-dir /tmp/b
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_workers/trainer_worker.py \
        --out fsdp --batch 4 --wrap fsdp --model-dir /tmp/tiny_bert --output-dir /tmp/c

``--wrap ddp``: the Trainer wraps the model in DDP. ``--wrap fsdp``: the model is loaded with
``from_pretrained(dir, distributed_config=DistributedConfig(fsdp_size=world))``, which shards it with
FSDP2 at load time (Accelerate's own FSDP plugin needs GPUs; this path runs on CPU). ``--batch`` is
the per-device batch: 2 ranks x 4 give the same global batches as 1 x 8 (Accelerate gives the ranks
consecutive slices of each global batch, drawn by the same seeded sampler). Dropout is off so that the
ranks and the single process compute the same function. Rank ``r`` writes ``<out>.rank<r>.json`` with,
per optimizer step, ``trainer.tower.hyperparameters()``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import BertForSequenceClassification, TrainerCallback

from hf_hyperopt.launch import close_process_group
from hf_hyperopt.trainer import HyperTrainer, HyperTrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models
from tiny_models import VOCAB, tiny_bert  # noqa: E402


def classification_data(n: int = 64) -> list[dict[str, torch.Tensor]]:
    """Label 1 when token 1 appears in the sequence."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, VOCAB, (n, 8), generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    x[y == 1, torch.randint(0, 8, (int(y.sum()),), generator=g)] = 1
    return [{"input_ids": x[i], "labels": y[i]} for i in range(n)]


class RecordHyper(TrainerCallback):
    """Every rank records the tower's hyperparameters after each optimizer step."""

    def __init__(self) -> None:
        self.trainer: HyperTrainer | None = None
        self.records: list[dict] = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.records.append({"step": state.global_step + 1, "hyper": self.trainer.tower.hyperparameters()})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--batch", type=int, required=True, help="per-device train batch size")
    ap.add_argument("--wrap", choices=("none", "ddp", "fsdp"), default="none")
    ap.add_argument("--model-dir", default="", help="a save_pretrained tiny_bert(dropout=0.0), for --wrap fsdp")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--optim", default="hyper_adam")
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    dtype = getattr(torch, args.dtype)
    if args.wrap == "fsdp":
        from transformers.distributed import DistributedConfig

        world = int(os.environ["WORLD_SIZE"])
        model = BertForSequenceClassification.from_pretrained(
            args.model_dir, dtype=dtype, distributed_config=DistributedConfig(fsdp_size=world)
        )
    else:
        model = tiny_bert(dropout=0.0).to(dtype)
    targs = HyperTrainingArguments(
        output_dir=args.output_dir,
        report_to="none",
        optim=args.optim,
        hyper_tower="adam(lr=0.01)",  # pinned, so a change of the package default cannot split the runs
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        logging_steps=5,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
        # transformers multiplies the loss by the world size for models whose forward takes loss kwargs
        # (BERT's does) and expects the loss to be a sum over num_items_in_batch; BERT's is a mean, so with
        # the default the distributed gradient would be world_size times the single-process one.
        average_tokens_across_devices=False,
        use_cpu=True,  # Accelerate's MULTI_CPU (gloo) under torchrun; without it a CPU run is not distributed
    )
    recorder = RecordHyper()
    trainer = HyperTrainer(model=model, args=targs, train_dataset=classification_data(), callbacks=[recorder])
    recorder.trainer = trainer
    trainer.train()
    rank = trainer.args.process_index
    result = {
        "rank": rank,
        "world": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "dtensor_params": sum(type(p).__name__ == "DTensor" for p in trainer.model.parameters()),
        "records": recorder.records,
    }
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    close_process_group()


if __name__ == "__main__":
    main()
    # torch can still abort a gloo rank in interpreter shutdown after a run that succeeded ("terminate
    # called without an active exception", SIGABRT), even with the process group destroyed; everything the
    # test reads is written by now, so leave without the interpreter's teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
