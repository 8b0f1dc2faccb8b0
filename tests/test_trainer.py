"""HyperTrainer end to end on tiny BERT and GPT-2 models built from config (offline, CPU, seconds).

Each test trains a few steps and asserts what a user would look at: the loss, the learned
hyperparameters in ``log_history`` / ``trainer_state.json`` / the trajectory file / the plot, and
that resuming, evaluation, accumulation, clipping, schedules, PEFT and bf16 behave.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, tiny_bert
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

import hf_hyperopt as hh
from hf_hyperopt.trainer import HYPER_OPTIMIZERS, HyperTrainer, HyperTrainingArguments, read_trajectory

# An initial step size per weight algorithm that trains the tiny classifier in a few dozen steps.
STEPS_TO_TRAIN = {"hyper_adagrad": 160, "hyper_rmsprop": 160}
LR = {"hyper_sgd": 0.1, "hyper_adam": 3e-3, "hyper_adamw": 3e-3, "hyper_adagrad": 0.05, "hyper_rmsprop": 2e-3}


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    # No dropout: accumulation over micro-batches must then reproduce the large batch.
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def classification_data(n: int = 64, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Label 1 when the first token is in the lower half of the vocabulary: learnt in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, VOCAB, (n, 8), generator=g)
    y = (x[:, 0] <= VOCAB // 2).long()
    return [{"input_ids": x[i], "labels": y[i]} for i in range(n)]


def lm_data(n: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Sequences counting upwards modulo the vocabulary from a random start: the next token is predictable."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    x = (start + torch.arange(12)) % VOCAB
    return [{"input_ids": x[i], "labels": x[i]} for i in range(n)]


def hyper_args(tmp_path: Path, optim: str = "hyper_adam", **kw) -> HyperTrainingArguments:
    base = {
        "output_dir": str(tmp_path),
        "report_to": "none",
        "optim": optim,
        "learning_rate": LR.get(optim, 3e-3),
        "per_device_train_batch_size": 8,
        "max_steps": 24,
        "logging_steps": 4,
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        "seed": 0,
    }
    base.update(kw)
    return HyperTrainingArguments(**base)


def train_logs(trainer: Trainer) -> list[dict]:
    return [r for r in trainer.state.log_history if "loss" in r]


@pytest.mark.parametrize("optim", HYPER_OPTIMIZERS)
def test_each_hyper_optimizer_trains_learns_and_logs(optim, tmp_path):
    data = classification_data()
    # The default tower's ramp starts from a small step (0.1% of the weights' norm) and the level above
    # climbs from there; AdaGrad's and RMSProp's steps, larger at first and then shrinking, take longer.
    steps = STEPS_TO_TRAIN.get(optim, 64)
    args = hyper_args(tmp_path, optim, max_steps=steps, logging_steps=8)
    trainer = HyperTrainer(model=tiny_bert(), args=args, train_dataset=data)
    before = trainer.evaluate(data)["eval_loss"]
    trainer.train()
    assert trainer.evaluate(data)["eval_loss"] < before - 0.02
    logs = train_logs(trainer)
    # The learned step size moved, and every logging step carries both levels.
    initial = LR[optim]
    assert all({"hyper/0/lr", "hyper/1/lr"} <= r.keys() for r in logs)
    assert abs(math.log(logs[-1]["hyper/0/lr"] / initial)) > 1e-3
    top = hh.parse_spec(hh.DEFAULT_HYPER["default"])[0].values["lr"]
    assert logs[-1]["hyper/1/lr"] == pytest.approx(top)  # the fixed top of the default tower
    # Constant schedule by default: the logged learning rate is the learned one.
    assert all(r["learning_rate"] == r["hyper/0/lr"] for r in logs)
    # One trajectory line per optimizer step, matching the logs at the logging steps.
    records = read_trajectory(tmp_path / "hyper_trajectory.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    by_step = {r["step"]: r for r in records}
    assert all(by_step[r["step"]]["hyper/0/lr"] == r["hyper/0/lr"] for r in logs)
    assert (tmp_path / "hyper_trajectories.png").stat().st_size > 1000
    # The card starts the weight level at the lr the run was given, not at the ramp's probe step.
    card = (tmp_path / "README.md").read_text()
    assert f"| 0 | lr | {initial:.4g} |" in card, card


def test_logged_keys_reach_trainer_state_json_and_group_scope_suffixes(tmp_path):
    args = hyper_args(tmp_path, hyper_scope="group", hyper_learn="lr+beta1", max_steps=8, save_steps=8,
                      save_strategy="steps")  # fmt: skip
    trainer = HyperTrainer(model=tiny_bert(), args=args, train_dataset=classification_data())
    trainer.train()
    state = json.loads((tmp_path / "checkpoint-8" / "trainer_state.json").read_text())
    logged = [r for r in state["log_history"] if "loss" in r][-1]
    for key in ("hyper/0/lr/group0", "hyper/0/lr/group1", "hyper/0/beta1/group0", "hyper/0/beta1/group1", "hyper/1/lr"):
        assert key in logged
    assert logged["hyper/0/beta1/group0"] != pytest.approx(0.9, abs=1e-9)
    assert logged["learning_rate"] == logged["hyper/0/lr/group0"]


def test_plain_trainer_arguments_behave_exactly_like_trainer(tmp_path):
    data = classification_data()
    kw = {"report_to": "none", "per_device_train_batch_size": 8, "max_steps": 6, "logging_steps": 2,
          "save_strategy": "no", "disable_tqdm": True, "dataloader_pin_memory": False, "optim": "adamw_torch"}  # fmt: skip
    ref = Trainer(model=tiny_bert(), args=TrainingArguments(output_dir=str(tmp_path / "a"), **kw), train_dataset=data)
    ref.train()
    ours = HyperTrainer(
        model=tiny_bert(), args=TrainingArguments(output_dir=str(tmp_path / "b"), **kw), train_dataset=data
    )
    ours.train()
    assert type(ours.optimizer.optimizer) is torch.optim.AdamW
    for a, b in zip(ref.model.parameters(), ours.model.parameters(), strict=True):
        assert torch.equal(a, b)
    strip = lambda h: [{k: v for k, v in r.items() if "runtime" not in k and "per_second" not in k} for r in h]
    assert strip(ref.state.log_history) == strip(ours.state.log_history)
    assert not (tmp_path / "b" / "hyper_trajectory.jsonl").exists()


def test_resume_from_checkpoint_is_bit_exact(tmp_path):
    data = classification_data()
    kw = {"max_steps": 8, "save_strategy": "steps", "save_steps": 4, "logging_steps": 2}
    full = HyperTrainer(model=tiny_bert(), args=hyper_args(tmp_path / "full", **kw), train_dataset=data)
    full.train()
    # Resume into a fresh folder: the trajectory so far comes from the checkpoint's copy.
    resumed = HyperTrainer(model=tiny_bert(seed=1), args=hyper_args(tmp_path / "resumed", **kw), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert full.tower.hyperparameters() == resumed.tower.hyperparameters()
    traj = read_trajectory(tmp_path / "full" / "hyper_trajectory.jsonl")
    assert read_trajectory(tmp_path / "resumed" / "hyper_trajectory.jsonl") == traj
    hyper = lambda h: [{k: v for k, v in r.items() if k.startswith("hyper/") or k == "step"} for r in h if "loss" in r]
    assert hyper(resumed.state.log_history) == hyper(full.state.log_history)
    # Resume in the run's own folder after it went past the checkpoint: later lines are cut back.
    shutil.rmtree(tmp_path / "full" / "checkpoint-8")
    again = HyperTrainer(model=tiny_bert(seed=2), args=hyper_args(tmp_path / "full", **kw), train_dataset=data)
    (tmp_path / "full" / "checkpoint-4" / "hyper_trajectory.jsonl").unlink()  # only the run's own file is left
    again.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert read_trajectory(tmp_path / "full" / "hyper_trajectory.jsonl") == traj


def test_evaluation_never_changes_hyperparameters_and_best_model_loads(tmp_path):
    # Without dropout, so that the random numbers an evaluation dataloader draws cannot matter.
    data = classification_data()
    plain = HyperTrainer(
        model=tiny_bert(dropout=0.0), args=hyper_args(tmp_path / "plain", max_steps=8), train_dataset=data
    )
    plain.train()
    kw = {"max_steps": 8, "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "steps", "save_steps": 2,
          "save_total_limit": 1, "load_best_model_at_end": True, "metric_for_best_model": "loss"}  # fmt: skip
    evald = HyperTrainer(model=tiny_bert(dropout=0.0), args=hyper_args(tmp_path / "eval", **kw), train_dataset=data,
                         eval_dataset=classification_data(16, seed=3))  # fmt: skip
    evald.train()
    assert len([r for r in evald.state.log_history if "eval_loss" in r]) == 4
    assert read_trajectory(tmp_path / "eval" / "hyper_trajectory.jsonl") == read_trajectory(
        tmp_path / "plain" / "hyper_trajectory.jsonl"
    )
    assert len(list((tmp_path / "eval").glob("checkpoint-*"))) <= 2  # save_total_limit keeps the best too
    assert evald.state.best_model_checkpoint is not None
    # An evaluation after training leaves the tower exactly as it was.
    theta = [t.clone() for t in evald.tower._tower_state.theta]
    evald.evaluate()
    assert all(torch.equal(a, b) for a, b in zip(theta, evald.tower._tower_state.theta, strict=True))


def test_gpt2_gradient_accumulation_matches_the_large_batch(tmp_path):
    data = lm_data()
    # SGD, whose step is proportional to the gradient, so a mis-scaled accumulated gradient would show.
    common = {"optim": "hyper_sgd", "learning_rate": 0.5, "max_steps": 6, "logging_steps": 2}
    big = HyperTrainer(model=tiny_gpt2(), args=hyper_args(tmp_path / "big", per_device_train_batch_size=8, **common),
                       train_dataset=data)  # fmt: skip
    big.train()
    acc = HyperTrainer(
        model=tiny_gpt2(),
        args=hyper_args(tmp_path / "acc", per_device_train_batch_size=4, gradient_accumulation_steps=2, **common),
        train_dataset=data,
    )
    acc.train()
    records = read_trajectory(tmp_path / "acc" / "hyper_trajectory.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))  # one line per optimizer step, not per micro-batch
    assert acc.tower.hyperparameters()[0]["lr"] == pytest.approx(big.tower.hyperparameters()[0]["lr"], rel=1e-4)
    assert acc.tower.hyperparameters()[0]["lr"] != pytest.approx(0.5, rel=1e-3)
    for a, b in zip(big.model.parameters(), acc.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    logs = train_logs(acc)
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_max_grad_norm_clips_what_the_tower_sees(tmp_path):
    model = tiny_bert()
    before = [p.detach().clone() for p in model.parameters()]
    args = hyper_args(tmp_path, "hyper_sgd", learning_rate=0.1, max_grad_norm=0.01, max_steps=1, logging_steps=1,
                      hyper_tower="adam(lr=0.05)")  # no ramp: its first step is a probe  # fmt: skip
    trainer = HyperTrainer(model=model, args=args, train_dataset=classification_data())
    trainer.train()
    assert trainer.state.log_history[0]["grad_norm"] > 0.01
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    # SGD moves the weights by lr * clipped gradient: norm 0.1 * 0.01.
    assert moved.norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_explicit_schedule_multiplies_the_learned_step_size(tmp_path):
    args = hyper_args(tmp_path, lr_scheduler_type="linear", warmup_steps=4, max_steps=12, logging_steps=1)
    trainer = HyperTrainer(model=tiny_bert(), args=args, train_dataset=classification_data())
    trainer.train()
    records = read_trajectory(tmp_path / "hyper_trajectory.jsonl")
    for r in records:
        s = r["step"] - 1  # the schedule's step count when optimizer step r["step"] ran
        factor = s / 4 if s < 4 else (12 - s) / 8
        assert r["learning_rate"] == pytest.approx(r["hyper/0/lr"] * factor, rel=1e-6, abs=1e-12)
    assert records[-1]["hyper/0/lr"] != pytest.approx(LR["hyper_adam"], rel=1e-4)
    logged = {r["step"]: r["learning_rate"] for r in trainer.state.log_history if "loss" in r}
    assert all(logged[r["step"]] == r["learning_rate"] for r in records)


def test_ready_tower_gets_a_constant_schedule_and_trajectories(tmp_path):
    args = HyperTrainingArguments(output_dir=str(tmp_path), report_to="none", optim="adamw_torch", max_steps=6,
                                  logging_steps=2, disable_tqdm=True, per_device_train_batch_size=8)  # fmt: skip
    opt_kw = {"lr": 3e-3, "hyper": "sgd(lr=1e-6)"}
    trainer = HyperTrainer(model=tiny_bert(), args=args, train_dataset=classification_data(),
                           optimizer_cls_and_kwargs=(hh.HyperAdam, opt_kw))  # fmt: skip
    trainer.train()
    records = read_trajectory(tmp_path / "hyper_trajectory.jsonl")
    assert len(records) == 6 and all(r["learning_rate"] == r["hyper/0/lr"] for r in records)


def test_peft_lora_only_trainable_parameters_are_in_the_tower(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_bert(), peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    trainer = HyperTrainer(model=model, args=hyper_args(tmp_path, max_steps=8), train_dataset=classification_data())
    trainer.train()
    in_tower = {id(p) for g in trainer.tower.param_groups for p in g["params"]}
    assert in_tower == trainable and len(in_tower) < len(list(model.parameters()))
    assert read_trajectory(tmp_path / "hyper_trajectory.jsonl")[-1]["hyper/0/lr"] != pytest.approx(3e-3, rel=1e-4)


@pytest.mark.parametrize(("trainable", "worst_is_best"), [("weights", True), ("biases", False)])
def test_group_scope_leaves_out_a_param_group_without_parameters(trainable, worst_is_best, tmp_path):
    # LoRA without trainable biases or norms leaves the Trainer's no-decay group (1) empty, BitFit (biases
    # only) its weight-decay group (0): the empty group's lr moves no weight, so it must not be logged, stand
    # in for the learning rate, reach the card, or be read back for the best checkpoint.
    model = tiny_bert(dropout=0.0)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias") == (trainable == "biases") and "LayerNorm" not in name)
    # A "best" checkpoint before the last (by the highest or the lowest loss, whichever is early here), whose
    # values the card reads back from the trajectory.
    kw = {"max_steps": 8, "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "steps", "save_steps": 2,
          "load_best_model_at_end": True, "metric_for_best_model": "loss", "greater_is_better": worst_is_best,
          "hyper_scope": "group"}  # fmt: skip
    trainer = HyperTrainer(model=model, args=hyper_args(tmp_path, **kw), train_dataset=classification_data(),
                           eval_dataset=classification_data(16, seed=3))  # fmt: skip
    trainer.train()
    empty, full = (1, 0) if trainable == "weights" else (0, 1)
    assert not trainer.tower.param_groups[empty]["params"] and trainer.tower.param_groups[full]["params"]
    records = read_trajectory(tmp_path / "hyper_trajectory.jsonl")
    logs = train_logs(trainer)
    for r in [*records, *logs]:
        assert f"hyper/0/lr/group{full}" in r and f"hyper/0/lr/group{empty}" not in r
    assert all(r["learning_rate"] == r[f"hyper/0/lr/group{full}"] for r in logs)
    card = (tmp_path / "README.md").read_text()
    assert f"Param groups without parameters (left out): {empty}" in card
    row = next(line for line in card.splitlines() if line.startswith("| 0 | lr |"))
    assert row.count(",") == 0, row  # one value a column: the group with parameters
    step = int(Path(trainer.state.best_model_checkpoint).name.split("-")[1])
    assert step < 8  # read back from the trajectory, not the tower's last values
    best = next(r for r in records if r["step"] == step)[f"hyper/0/lr/group{full}"]
    assert f"{best:.4g} |" in row, (row, best)


def test_bf16_autocast_on_cpu(tmp_path):
    model = tiny_bert()
    before = [p.detach().clone() for p in model.parameters()]
    args = hyper_args(tmp_path, bf16=True, use_cpu=True, max_steps=4, logging_steps=2)
    trainer = HyperTrainer(model=model, args=args, train_dataset=classification_data())
    trainer.train()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert trainer.tower.skipped_hyper_updates() == [0]
    assert math.isfinite(train_logs(trainer)[-1]["hyper/0/lr"])


def test_tensorboard_receives_the_hyper_keys(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = hyper_args(tmp_path, report_to="tensorboard", max_steps=4, logging_steps=2)
    HyperTrainer(model=tiny_bert(), args=args, train_dataset=classification_data()).train()
    events = [EventAccumulator(str(p.parent)).Reload() for p in (tmp_path / "tb").rglob("events.out.tfevents.*")]
    tags = {t for ea in events for t in ea.Tags()["scalars"]}
    assert {"train/hyper/0/lr", "train/hyper/1/lr", "train/learning_rate"} <= tags


class _Stream(torch.utils.data.IterableDataset):
    """Examples without a length: the Trainer then counts the run in max_steps, and there are no epochs."""

    def __iter__(self):
        while True:
            yield from classification_data()


@pytest.mark.parametrize(
    ("dataset", "kw", "horizon"),
    [
        (classification_data(64), {"max_steps": 9}, 8),  # 64 examples at 8 a batch: an epoch is 8 steps
        (classification_data(64), {"max_steps": 9, "gradient_accumulation_steps": 3}, 3),  # 8 batches: 3 steps
        (classification_data(64), {"max_steps": 5}, 5),  # a run shorter than an epoch
        (_Stream(), {"max_steps": 6}, 6),  # a stream: the whole run
    ],
)
def test_trace_auto_spans_the_trainers_epoch(dataset, kw, horizon, tmp_path):
    """trace=auto's horizon is the Trainer's optimizer steps per epoch, or the run where that is shorter."""
    args = hyper_args(tmp_path, hyper_tower="adam(lr=0.05,trace=auto)", **kw)
    trainer = HyperTrainer(model=tiny_bert(), args=args, train_dataset=dataset)
    trainer.train()
    assert trainer.tower.horizon == horizon and trainer.tower.spec.endswith("adam(lr=0.05,trace=auto)")


def test_resume_with_trace_auto_is_bit_exact(tmp_path):
    """The horizon is set again on resuming, from the same dataloader: the resumed run is the run."""
    data = classification_data(48)  # 6 steps an epoch: the trace spans 6 of the 10
    kw = {"max_steps": 10, "save_strategy": "steps", "save_steps": 4,
          "hyper_tower": "adam(lr=0.05,beta1=0,trace=auto,ramp=0.001,normalize=true,timescale=100)"}  # fmt: skip
    full = HyperTrainer(model=tiny_bert(), args=hyper_args(tmp_path / "full", **kw), train_dataset=data)
    full.train()
    resumed = HyperTrainer(model=tiny_bert(seed=1), args=hyper_args(tmp_path / "resumed", **kw), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert resumed.tower.horizon == full.tower.horizon == 6
    assert full.tower.hyperparameters() == resumed.tower.hyperparameters()
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_plain_trainer_with_the_callback_counts_the_horizon_itself(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", max_steps=9, per_device_train_batch_size=8,
                             lr_scheduler_type="constant", disable_tqdm=True, save_strategy="no")  # fmt: skip
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=classification_data(48),
                      optimizer_cls_and_kwargs=(hh.HyperAdam, {"lr": 3e-3, "hyper": "adam(lr=0.05,trace=auto)"}))  # fmt: skip
    callback = hh.HyperCallback().attach(trainer)
    trainer.train()
    assert callback.horizon is None and callback.tower.horizon == 6  # 48 examples at 8 a batch


def test_run_horizon_reads_data_without_a_length_as_a_stream():
    from types import SimpleNamespace

    from hf_hyperopt.trainer.callback import run_horizon

    class NoLength:  # Ray's datasets raise AttributeError from len()
        def __len__(self):
            raise AttributeError("no length")

    args, state = SimpleNamespace(gradient_accumulation_steps=4), SimpleNamespace(max_steps=50)
    assert run_horizon(args, state, NoLength()) == 50
    assert run_horizon(args, state, list(range(30))) == 8  # 30 batches, 4 a step: 8 steps an epoch
    assert run_horizon(args, SimpleNamespace(max_steps=5), list(range(30))) == 5
