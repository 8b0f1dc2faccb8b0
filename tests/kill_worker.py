"""A HyperTrainer run that checkpoints every step, for the SIGKILL test in ``test_faults.py``.

It runs in a child of a ``forkserver`` that has already imported torch and transformers, so a kill
and a restart cost the training time only. Each start resumes from the newest checkpoint in its
output folder (``resume_from_checkpoint=True``, as a user restarts a killed job); the run that
finishes saves its weights and learned hyperparameters to ``final.pt``.
"""

from __future__ import annotations

import os

import torch
from tiny_models import VOCAB, tiny_bert

from hf_hyperopt.trainer import HyperTrainer, HyperTrainingArguments

STEPS = 12


def data(n: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, VOCAB, (n, 8), generator=g)
    y = (x[:, 0] <= VOCAB // 2).long()
    return [{"input_ids": x[i], "labels": y[i]} for i in range(n)]


def run(output_dir: str) -> None:
    torch.set_num_threads(1)  # the same arithmetic in every run, so that runs compare bit for bit
    args = HyperTrainingArguments(
        output_dir=output_dir, report_to="none", optim="hyper_adam", learning_rate=3e-3,
        hyper_tower="adam(lr=0.01)", per_device_train_batch_size=8, max_steps=STEPS, logging_steps=1,
        save_strategy="steps", save_steps=1, disable_tqdm=True, dataloader_pin_memory=False, seed=0,
    )  # fmt: skip
    trainer = HyperTrainer(model=tiny_bert(), args=args, train_dataset=data())
    resume = (
        any(name.startswith("checkpoint-") for name in os.listdir(output_dir)) if os.path.isdir(output_dir) else False
    )
    trainer.train(resume_from_checkpoint=resume or None)
    final = {
        "params": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "hyper": trainer.tower.hyperparameters(),
    }
    torch.save(final, os.path.join(output_dir, "final.pt"))
