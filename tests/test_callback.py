"""HyperCallback on a plain ``Trainer``, ``hf_hyperopt.unwrap`` through Accelerate, and the Accelerate example.

A user with a ready tower and a stock ``Trainer`` (or TRL trainer) adds ``callbacks=[HyperCallback()]``;
a user with a plain Accelerate loop reads the tower through ``hf_hyperopt.unwrap``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, tiny_bert
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import hf_hyperopt as hh
from hf_hyperopt.trainer import read_trajectory

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def classification_data(n: int = 64, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, VOCAB, (n, 8), generator=g)
    y = (x[:, 0] <= VOCAB // 2).long()
    return [{"input_ids": x[i], "labels": y[i]} for i in range(n)]


def plain_args(tmp_path: Path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), report_to="none", max_steps=8, logging_steps=2, disable_tqdm=True,
                per_device_train_batch_size=8, save_strategy="no", lr_scheduler_type="constant", seed=0)  # fmt: skip
    base.update(kw)
    return TrainingArguments(**base)


def test_plain_trainer_with_the_callback_logs_writes_the_trajectory_plot_and_card(tmp_path, caplog):
    caplog.set_level(logging.INFO)  # a script's logging.basicConfig(level=logging.INFO)
    opt_kw = {"lr": 3e-3, "hyper": "adam(lr=0.05)"}
    trainer = Trainer(model=tiny_bert(), args=plain_args(tmp_path), train_dataset=classification_data(),
                      optimizer_cls_and_kwargs=(hh.HyperAdam, opt_kw), callbacks=[hh.HyperCallback()])  # fmt: skip
    trainer.train()
    trainer.save_state()
    assert "hf_hyperopt: training with the tower adam(lr=0.003,beta1=0.9" in caplog.text
    logged = [r for r in json.loads((tmp_path / "trainer_state.json").read_text())["log_history"] if "loss" in r]
    assert len(logged) == 4 and all("hyper/0/lr" in r and "hyper/1/lr" in r for r in logged)
    # The effective step size, not the schedule's constant 3e-3: the tower has moved it.
    assert all(r["learning_rate"] == r["hyper/0/lr"] for r in logged)
    assert logged[-1]["hyper/0/lr"] != pytest.approx(3e-3, rel=1e-4)
    records = read_trajectory(tmp_path / "hyper_trajectory.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert {r["step"]: r["hyper/0/lr"] for r in records if r["step"] % 2 == 0} == {
        r["step"]: r["hyper/0/lr"] for r in logged
    }
    assert (tmp_path / "hyper_trajectories.png").stat().st_size > 0
    card = (tmp_path / "README.md").read_text()
    # Every weight-level value the run started from, torch defaults included.
    assert "`adam(lr=0.003,beta1=0.9,beta2=0.999,eps=1e-08,weight_decay=0.0,learn=lr)/adam(lr=0.05)`" in card


def test_attached_callback_survives_create_model_card_and_reaches_reporters_first(tmp_path):
    trainer = Trainer(model=tiny_bert(), args=plain_args(tmp_path, max_steps=4), train_dataset=classification_data(),
                      optimizer_cls_and_kwargs=(hh.HyperSGD, {"lr": 0.1, "hyper": "sgd(lr=1e-3)"}))  # fmt: skip
    callback = hh.HyperCallback().attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    trainer.create_model_card(model_name="tiny")  # rewrites README.md; the section must come back
    card = (tmp_path / "README.md").read_text()
    assert card.count("## Hyperoptimizer") == 1 and "sgd(lr=0.1,momentum=0.0,weight_decay=0.0,nesterov=false" in card


def test_a_trainer_keeps_one_hyper_callback(tmp_path, caplog):
    # Both documented ways at once, then one more added by hand: one callback does the work.
    first = hh.HyperCallback()
    trainer = Trainer(model=tiny_bert(), args=plain_args(tmp_path, max_steps=4, logging_steps=2),
                      train_dataset=classification_data(), callbacks=[first],
                      optimizer_cls_and_kwargs=(hh.HyperAdam, {"lr": 3e-3}))  # fmt: skip
    assert hh.HyperCallback().attach(trainer) is first
    trainer.add_callback(hh.HyperCallback())
    with caplog.at_level(logging.WARNING, logger="transformers.trainer"):
        trainer.train()
    assert sum(isinstance(cb, hh.HyperCallback) for cb in trainer.callback_handler.callbacks) == 2
    assert "this Trainer has two HyperCallbacks; the second does nothing" in caplog.text
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert logs and all(r["learning_rate"] == r["hyper/0/lr"] for r in logs)  # rewritten once, not twice
    assert [r["step"] for r in read_trajectory(tmp_path / "hyper_trajectory.jsonl")] == [1, 2, 3, 4]


def test_without_a_tower_the_callback_does_nothing(tmp_path):
    trainer = Trainer(model=tiny_bert(), args=plain_args(tmp_path, max_steps=2), train_dataset=classification_data(),
                      callbacks=[hh.HyperCallback()])  # fmt: skip
    trainer.train()
    assert not (tmp_path / "hyper_trajectory.jsonl").exists()
    assert all(not k.startswith("hyper/") for r in trainer.state.log_history for k in r)


def test_unwrap_reaches_the_tower_through_accelerate_and_refuses_a_plain_optimizer():
    from accelerate import Accelerator

    model = torch.nn.Linear(3, 2)
    opt = hh.HyperAdam(model.parameters(), lr=1e-3)
    prepared = Accelerator(cpu=True).prepare(opt)
    with pytest.raises(AttributeError):
        prepared.hyperparameters()  # what users hit without unwrap
    assert hh.unwrap(prepared) is opt and hh.unwrap(opt) is opt
    assert hh.unwrap(prepared).hyperparameters() == opt.hyperparameters()
    with pytest.raises(ValueError, match="no tower optimizer inside AcceleratedOptimizer -> SGD"):
        hh.unwrap(Accelerator(cpu=True).prepare(torch.optim.SGD(model.parameters(), lr=0.1)))


def test_accelerate_example_trains_and_learns_its_step_size():
    spec = importlib.util.spec_from_file_location("accelerate_loop", EXAMPLES / "accelerate_loop.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = example.main(steps=60, lr=1e-4)
    # The example gives the default's trace=auto its horizon (16 batches an epoch), so nothing warns of it.
    assert not [w for w in caught if "horizon" in str(w.message)]
    # From 1e-4 the default tower raises the step size, and the loss falls below the targets' variance.
    assert out["lr"] > 3 * out["initial_lr"]
    assert out["loss"] < 0.6


def test_plain_trainer_resume_keeps_the_trajectory_up_to_the_checkpoint(tmp_path):
    def make() -> Trainer:
        args = plain_args(tmp_path, save_strategy="steps", save_steps=4)
        return Trainer(model=tiny_bert(), args=args, train_dataset=classification_data(),
                       optimizer_cls_and_kwargs=(hh.HyperAdam, {"lr": 3e-3}), callbacks=[hh.HyperCallback()])  # fmt: skip

    make().train()
    full = read_trajectory(tmp_path / "hyper_trajectory.jsonl")
    assert read_trajectory(tmp_path / "checkpoint-4" / "hyper_trajectory.jsonl") == full[:4]
    (tmp_path / "hyper_trajectory.jsonl").write_text("not a trajectory of this run\n")
    make().train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    resumed = read_trajectory(tmp_path / "hyper_trajectory.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 9)) and resumed[:4] == full[:4]
    assert resumed == full  # and the resumed steps are the ones the first run took (CPU: bit for bit)
    # The card's starting values are the tower's configuration, not the checkpoint's learned ones.
    assert "| 0 | lr | 0.003 |" in (tmp_path / "README.md").read_text()


def test_trl_sft_trainer_with_a_ready_tower_and_the_callback(tmp_path):
    pytest.importorskip("trl")
    from trl import SFTConfig, SFTTrainer

    spec = importlib.util.spec_from_file_location("sft_tiny", Path(__file__).parent / "stock_scripts" / "sft_tiny.py")
    sft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sft)
    tokenizer = sft.make_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))  # fmt: skip
    config = SFTConfig(output_dir=str(tmp_path), report_to="none", max_steps=4, logging_steps=2, max_length=16,
                       per_device_train_batch_size=8, lr_scheduler_type="constant", bf16=False, disable_tqdm=True,
                       save_strategy="no")  # fmt: skip
    trainer = SFTTrainer(model=model, args=config, train_dataset=sft.make_dataset(), processing_class=tokenizer,
                         optimizer_cls_and_kwargs=(hh.HyperAdamW, {"lr": 3e-3}), callbacks=[hh.HyperCallback()])  # fmt: skip
    trainer.train()
    assert [r["step"] for r in read_trajectory(tmp_path / "hyper_trajectory.jsonl")] == [1, 2, 3, 4]
    assert all("hyper/0/lr" in r for r in trainer.state.log_history if "loss" in r)


@pytest.mark.parametrize("scope", ["shared", "group", "tensor"])
def test_initial_values_of_a_resumed_run_keep_the_scopes_shape(scope):
    """A run resumed where nobody recorded the start (the launcher's stock scripts) reads it from the
    configuration: per group or per tensor as the learned values are, not one value (the card's 'initial'
    column collapsed them)."""
    from hf_hyperopt.trainer.callback import _initial_from_config

    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))]
    tower = hh.HyperAdam([{"params": params[:1]}, {"params": params[1:]}], lr=1e-3, scope=scope)
    for p in params:
        p.grad = torch.randn_like(p)
    tower.step()  # the learned values now differ from the start
    initial = _initial_from_config(tower)
    expected = {"shared": 1e-3, "group": [1e-3, 1e-3], "tensor": [1e-3, 1e-3]}[scope]
    assert initial[0]["lr"] == pytest.approx(expected)
    assert type(initial[0]["lr"]) is type(tower.hyperparameters()[0]["lr"])


def test_a_stalled_learned_lr_is_said_once_a_run(tmp_path, monkeypatch):
    """The learned lr 10^4 times below its peak (the long runs' collapse, docs/optimizers.md): one warning,
    read from the learned values (group scope: the largest unit's), not from a schedule's factor."""
    from hf_hyperopt.trainer import callback as cb

    said = []
    monkeypatch.setattr(cb._trainer_logger, "warning", lambda msg, *a: said.append(msg % a))
    trainer = Trainer(model=tiny_bert(), args=plain_args(tmp_path), train_dataset=classification_data(),
                      optimizer_cls_and_kwargs=(hh.HyperAdam, {"lr": 3e-3}))  # fmt: skip
    callback = hh.HyperCallback(plot=False, card=False).attach(trainer)
    trainer.train()
    assert said == []  # a run that trains says nothing
    watching = hh.HyperCallback(plot=False, card=False)
    watching.tower = callback.tower  # a fresh run's memory of the largest lr, on the trained tower
    values = iter([(2e-3, 1e-5), (1e-3, 5e-7), (1.9e-7, 1e-9), (1e-7, 1e-9), (1e-8, 1e-3)])
    monkeypatch.setattr(cb, "hyper_logs", lambda tower, schedule_lr=None: dict(zip(
        ("hyper/0/lr/group0", "hyper/0/lr/group1"), next(values), strict=True)) | {"learning_rate": 0.0})  # fmt: skip
    for step in range(10, 15):
        trainer.state.global_step = step
        watching.on_log(trainer.args, trainer.state, None, logs={"learning_rate": 1.0})
    assert len(said) == 1
    assert "at step 12 the learned lr is 1.9e-07, over 10000 times below the 0.002 it held at step 10" in said[0]
    assert "docs/optimizers.md" in said[0]


def test_plain_trainer_resumed_without_optimizer_state_warns_and_the_card_says_so(tmp_path):
    """HyperTrainer warned that the learned values restart; a plain Trainer with the callback (so the
    launcher) restarted them without a word."""
    from hf_hyperopt.trainer.resume import TowerNotRestoredWarning

    def trainer(**kw):
        args = plain_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, save_only_model=True, **kw)
        return Trainer(model=tiny_bert(), args=args, train_dataset=classification_data(),
                       optimizer_cls_and_kwargs=(hh.HyperAdam, {"lr": 3e-3, "hyper": "adam(lr=0.05)"}),
                       callbacks=[hh.HyperCallback()])  # fmt: skip

    trainer().train()
    with pytest.warns(TowerNotRestoredWarning, match=r"checkpoint-2 has no optimizer state.*lr=0\.003.*at step 2"):
        resumed = trainer()
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "Resumed at step 2 from a checkpoint without the optimizer state" in (tmp_path / "README.md").read_text()


def test_attached_callback_resumed_from_another_folder_keeps_the_trajectory(tmp_path):
    """A plain Trainer resumed from a checkpoint outside its output_dir: the callback looked for the
    trajectory in its own output_dir, and the new run's file started at the resumed step."""

    def trainer(out, steps):
        args = plain_args(out, max_steps=steps, save_strategy="steps", save_steps=2)
        t = Trainer(model=tiny_bert(), args=args, train_dataset=classification_data(),
                    optimizer_cls_and_kwargs=(hh.HyperAdam, {"lr": 3e-3, "hyper": "adam(lr=0.05)"}))  # fmt: skip
        hh.HyperCallback().attach(t)
        return t

    trainer(tmp_path / "first", 4).train()
    saved = read_trajectory(tmp_path / "first" / "checkpoint-2" / "hyper_trajectory.jsonl")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trainer(tmp_path / "second", 4).train(resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-2"))
    assert not [w for w in said if "trajectory" in str(w.message)]
    records = read_trajectory(tmp_path / "second" / "hyper_trajectory.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[:2] == saved
