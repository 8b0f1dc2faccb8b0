"""A stock Hugging Face training script, shaped like transformers' examples/pytorch/run_classification.py.

It knows nothing of hf_hyperopt: ``TrainingArguments`` and ``Trainer`` from ``transformers``, parsed with
``HfArgumentParser``, logging set up as the examples do. The tests run it through
``python -m hf_hyperopt.launch`` (and ``torchrun -m hf_hyperopt.launch``). Offline: a one-layer BERT
built from config and an in-memory task (label 1 when the first token is in the lower half).

    python tests/stock_scripts/run_tiny_classification.py --output_dir out --max_steps 8
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser, Trainer, TrainingArguments

logger = logging.getLogger(__name__)
VOCAB = 32


@dataclass
class DataArguments:
    num_examples: int = field(default=64, metadata={"help": "Training examples in the synthetic task."})


def make_data(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, VOCAB, (n, 8), generator=g)
    y = (x[:, 0] <= VOCAB // 2).long()
    return [{"input_ids": x[i], "labels": y[i]} for i in range(n)]


def main() -> None:
    parser = HfArgumentParser((DataArguments, TrainingArguments))
    data_args, training_args = parser.parse_args_into_dataclasses()
    # As the examples do: the script's and transformers' INFO lines on the main process.
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler(sys.stdout)]
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()

    torch.manual_seed(training_args.seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=8, num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(config)
    trainer = Trainer(model=model, args=training_args, train_dataset=make_data(data_args.num_examples))
    result = trainer.train()
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    trainer.create_model_card(model_name="tiny-classifier")


if __name__ == "__main__":
    main()
    # torch can abort a gloo rank in interpreter shutdown after a run that succeeded ("terminate called
    # without an active exception", SIGABRT); the outputs are written, so this test script leaves without
    # the interpreter's teardown (a real script would not need to: the failure is torch's, at exit).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
