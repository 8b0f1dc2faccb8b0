"""``python -m hf_hyperopt.launch``: unmodified Hugging Face scripts train tower optimizers.

The scripts in ``tests/stock_scripts/`` import nothing from hf_hyperopt: a ``run_classification``-style
script on ``TrainingArguments`` / ``Trainer``, and a TRL ``sft.py``-style script on ``SFTConfig`` /
``SFTTrainer``. Each run goes through a subprocess, as a user's would (the launcher wraps
``Trainer.__init__`` in its own process only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_bert
from transformers import Trainer, TrainingArguments

from hf_hyperopt.launch import configure_trainer, split_argv
from hf_hyperopt.trainer import HyperCallback, HyperTrainingArguments, read_trajectory

SCRIPTS = Path(__file__).parent / "stock_scripts"
REPO = Path(__file__).resolve().parents[1]
COMMON = ["--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "2", "--learning_rate", "3e-3",
          "--seed", "0"]  # fmt: skip


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def run(cmd: list[str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=400)
    if ok and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def launch(args: list[str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "hf_hyperopt.launch", *args], cwd, ok)


def logged(out: Path) -> list[dict]:
    return [r for r in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in r]


# ------------------------------------------------------------------ the command line
def test_split_argv_takes_only_the_launchers_flags():
    settings, rest, explicit = split_argv(
        [
            "--output_dir",
            "o",
            "--optim=hyper_sgd",
            "--hyper-tower",
            "adam(lr=0.01)",
            "--hyper_scope",
            "group",
            "--learning_rate",
            "0.1",
        ]  # fmt: skip
    )
    assert (settings.optim, settings.tower, settings.learn, settings.scope) == (
        "hyper_sgd",
        "adam(lr=0.01)",
        "lr",
        "group",
    )
    assert rest == ["--output_dir", "o", "--learning_rate", "0.1"] and not explicit
    assert split_argv(["--optim", "adamw_torch", "--lr_scheduler_type=cosine"]) == (
        None, ["--optim", "adamw_torch", "--lr_scheduler_type=cosine"], True)  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--hyper_tower", "sgd(lr=1e-5)"], "without a tower optimizer; add --optim"),
        (["--optim", "hyper_adam", "--hyper_scope", "layer"], "--hyper_scope 'layer' is not one of"),
        (["--optim", "hyper_sgd", "--hyper_learn", "beta1"], "'beta1' is not a hyperparameter of sgd"),
        (["--optim", "hyper_adam", "--hyper_tower", "sgd(lr=1e-5)x"], "cannot parse level 1"),
        (["--optim"], "--optim needs a value"),
        (["--optim", "hyper_adam", "--optim=hyper_sgd"], r"--optim is given twice \('hyper_adam' and 'hyper_sgd'\)"),
        (["--optim", "hyper_adam", "--optim", "adamw_torch"], "--optim is given twice"),  # the tower would train
        (["--optim", "adamw_torch", "--optim", "hyper_adam"], "--optim is given twice"),
        # the weight level's values on the command line: refused before the script runs, naming the flag
        (["--optim", "hyper_adam", "--weight_decay", "-0.1"], "--weight_decay -0.1 is not allowed"),
        (["--optim", "hyper_adam", "--learning-rate=0"], "lr=0.0: the default mode.*come from --learning_rate"),
        (["--optim", "hyper_adam", "--adam_beta1", "1.0"], r"beta1=1.0 is outside \[0, 1\).*--adam_beta1"),
        (["--optim", "hyper_sgd", "--optim_args", "momentum=0.9,momentum=0"], "gives momentum more than once"),
    ],
)
def test_bad_flags_are_refused_with_what_is_allowed(argv, match):
    with pytest.raises(ValueError, match=match):
        split_argv(argv)


def test_bad_flags_stop_the_launcher_before_the_script_runs(tmp_path):
    proc = launch([str(SCRIPTS / "run_tiny_classification.py"), "--output_dir", str(tmp_path / "out"),
                   "--optim", "hyper_adam", "--hyper_scope", "layer"], tmp_path, ok=False)  # fmt: skip
    assert proc.returncode != 0 and "--hyper_scope 'layer' is not one of" in proc.stderr
    assert not (tmp_path / "out").exists()


def _trainer(tmp_path: Path, **kw):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", **kw.pop("args", {}))
    return Trainer(model=tiny_bert(), args=args, **kw)


def test_configure_trainer_builds_the_tower_from_the_stock_arguments(tmp_path):
    settings, _, _ = split_argv(["--optim", "hyper_sgd", "--hyper_tower", "adam(lr=0.02)"])
    trainer = _trainer(tmp_path, args={"learning_rate": 0.1, "optim_args": "momentum=0.9", "warmup_steps": 2})
    configure_trainer(trainer, settings, explicit_schedule=False)
    cls, kwargs = trainer.optimizer_cls_and_kwargs
    assert cls.__name__ == "HyperSGD" and kwargs["lr"] == 0.1 and kwargs["momentum"] == 0.9
    assert kwargs["hyper"] == "adam(lr=0.02)" and kwargs["learn"] == "lr" and kwargs["scope"] == "shared"
    assert str(trainer.args.lr_scheduler_type.value) == "constant_with_warmup" and trainer.args.optim == "hyper_sgd"
    assert isinstance(trainer.callback_handler.callbacks[0], HyperCallback)

    explicit = _trainer(tmp_path, args={"lr_scheduler_type": "cosine"})
    configure_trainer(explicit, settings, explicit_schedule=True)
    assert str(explicit.args.lr_scheduler_type.value) == "cosine"  # multiplies the learned step size
    # A schedule the script's config file or code sets is asked for too (it was replaced by the constant one).
    in_code = _trainer(tmp_path, args={"lr_scheduler_type": "cosine"})
    configure_trainer(in_code, settings, explicit_schedule=False)
    assert str(in_code.args.lr_scheduler_type.value) == "cosine"


def test_configure_trainer_refuses_what_it_cannot_honour(tmp_path):
    settings, _, _ = split_argv(["--optim", "hyper_adam"])
    own = _trainer(tmp_path, optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}))
    with pytest.raises(ValueError, match="passes its own optimizer"):
        configure_trainer(own, settings, explicit_schedule=False)
    hyper_args = HyperTrainingArguments(output_dir=str(tmp_path), report_to="none", optim="hyper_adam")
    with pytest.raises(ValueError, match="already uses HyperTrainingArguments"):
        configure_trainer(Trainer(model=tiny_bert(), args=hyper_args), settings, explicit_schedule=False)
    bad = _trainer(tmp_path, args={"optim_args": "dampening=0.5"})
    with pytest.raises(ValueError, match="optim_args dampening=0.5 is not taken by --optim hyper_adam"):
        configure_trainer(bad, settings, explicit_schedule=False)
    # values the script sets in code, which split_argv never saw
    in_code = _trainer(tmp_path, args={"weight_decay": -0.1})
    with pytest.raises(ValueError, match="--weight_decay -0.1 is not allowed"):
        configure_trainer(in_code, settings, explicit_schedule=False)


# ------------------------------------------------------------------ runs
def test_stock_script_trains_a_tower_with_logs_trajectory_plot_and_card(tmp_path):
    out = tmp_path / "out"
    proc = launch([str(SCRIPTS / "run_tiny_classification.py"), "--output_dir", str(out), "--max_steps", "8",
                   *COMMON, "--optim", "hyper_adam", "--hyper_tower", "adam(lr=0.05)"], tmp_path)  # fmt: skip
    rows = logged(out)
    assert len(rows) == 4 and all("hyper/0/lr" in r and r["learning_rate"] == r["hyper/0/lr"] for r in rows)
    assert rows[-1]["hyper/0/lr"] != pytest.approx(3e-3, rel=1e-4)  # learned
    assert [r["step"] for r in read_trajectory(out / "hyper_trajectory.jsonl")] == list(range(1, 9))
    assert (out / "hyper_trajectories.png").is_file()
    card = (out / "README.md").read_text()  # written by the script's create_model_card()
    assert card.count("## Hyperoptimizer") == 1
    assert "adam(lr=0.003,beta1=0.9,beta2=0.999,eps=1e-08,weight_decay=0.0,learn=lr)/adam(lr=0.05)" in card
    # Where the script's logging shows it, beside the Trainer's own start-of-training lines.
    assert "hf_hyperopt: training with the tower adam(lr=0.003" in proc.stdout + proc.stderr
    saved = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert saved["log_history"][-1]["hyper/0/lr"] == rows[-1]["hyper/0/lr"]
    assert (out / "checkpoint-8" / "hyper_trajectory.jsonl").is_file()


def test_a_standard_optim_is_left_alone(tmp_path):
    out = tmp_path / "out"
    launch([str(SCRIPTS / "run_tiny_classification.py"), "--output_dir", str(out), "--max_steps", "2", *COMMON,
            "--optim", "adamw_torch"], tmp_path)  # fmt: skip
    assert not (out / "hyper_trajectory.jsonl").exists()
    assert all(not k.startswith("hyper/") for r in logged(out) for k in r)


# --standalone: a rendezvous on localhost with a free port. --use_cpu: Accelerate's MULTI_CPU (gloo).
LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"],
}  # fmt: skip


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_train_one_tower_and_write_one_trajectory(launcher, tmp_path):
    out = tmp_path / "out"
    proc = run([sys.executable, *LAUNCHERS[launcher], "-m", "hf_hyperopt.launch",
                str(SCRIPTS / "run_tiny_classification.py"), "--output_dir", str(out), "--max_steps", "6",
                "--per_device_train_batch_size", "4", "--use_cpu", "true", *COMMON, "--optim", "hyper_adamw"],
               tmp_path)  # fmt: skip
    text = proc.stdout + proc.stderr
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in text  # two ranks
    # Rank 0 only, like the Trainer's own banner (with CI=true transformers' loggers also propagate to
    # the script's root handler, so each such line can show up twice).
    banner = text.count("***** Running training *****")
    assert banner >= 1 and text.count("hf_hyperopt: training with the tower") == banner
    rows = logged(out)
    assert len(rows) == 3 and all("hyper/0/lr" in r and "hyper/1/lr" in r for r in rows)
    assert [r["step"] for r in read_trajectory(out / "hyper_trajectory.jsonl")] == list(range(1, 7))
    assert (out / "hyper_trajectories.png").is_file()


def test_trl_sft_trainer_through_the_launcher(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "out"
    launch([str(SCRIPTS / "sft_tiny.py"), "--output_dir", str(out), "--max_steps", "4", *COMMON,
            "--per_device_train_batch_size", "8", "--max_length", "16", "--bf16", "false",
            "--optim", "hyper_adamw"], tmp_path)  # fmt: skip
    records = read_trajectory(out / "hyper_trajectory.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["hyper/0/lr"] != pytest.approx(3e-3)
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert all("hyper/0/lr" in r for r in state["log_history"] if "loss" in r)
    assert (out / "hyper_trajectories.png").is_file() and "## Hyperoptimizer" in (out / "README.md").read_text()
