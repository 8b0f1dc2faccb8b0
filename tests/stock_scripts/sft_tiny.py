"""A TRL script shaped like trl/scripts/sft.py: ``SFTConfig`` parsed with ``HfArgumentParser``, ``SFTTrainer``.

It knows nothing of hf_hyperopt; the tests run it through ``python -m hf_hyperopt.launch``. Offline: a
one-layer GPT-2 built from config, a word-level tokenizer built in memory, and 32 short sentences.

    python tests/stock_scripts/sft_tiny.py --output_dir out --max_steps 4
"""

from __future__ import annotations

import torch
from datasets import Dataset
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "rug", "fast", "slow", "and"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def make_dataset(n: int = 32, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (6,), generator=g)) for _ in range(n)]
    return Dataset.from_dict({"text": texts})


def main() -> None:
    (config,) = HfArgumentParser((SFTConfig,)).parse_args_into_dataclasses()
    tokenizer = make_tokenizer()
    torch.manual_seed(config.seed)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=16,
            n_embd=16,
            n_layer=1,
            n_head=2,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=make_dataset(), processing_class=tokenizer)
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main()
