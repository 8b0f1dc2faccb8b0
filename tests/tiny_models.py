"""The tiny BERT classifier the Trainer tests train, importable by the tests and by the torchrun workers."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

VOCAB = 32


def tiny_bert(
    seed: int = 0, dropout: float = 0.1, hidden_size: int = 16, intermediate_size: int = 32
) -> BertForSequenceClassification:
    """One layer, two heads, a 32-token vocabulary, sequences of at most 8 tokens, 2 labels; weights from ``seed``."""
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=intermediate_size,
        max_position_embeddings=8,
        num_labels=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(cfg)
