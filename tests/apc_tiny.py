"""Tiny APC stand-ins: fixed-probability discriminators and random tiny BERT classifiers (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from personafuse.context import bundled_sentence_encoder_path


class FixedDiscriminator:
    """Returns the probability rows ``table(text)`` gives, and counts its calls like ``Discriminator``."""

    def __init__(self, labels, table):
        self.labels, self.table = tuple(labels), table
        self.calls = 0
        self.texts_scored = 0

    def probabilities(self, texts):
        self.calls += 1
        self.texts_scored += len(texts)
        return torch.tensor([self.table(t) for t in texts], dtype=torch.float32)


def tiny_bert_classifier(path: Path, num_labels: int, seed: int = 0, max_positions: int = 128) -> Path:
    """A random 1-layer BERT classifier with MiniLM's tokenizer, saved to ``path``."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(bundled_sentence_encoder_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=max_positions, num_labels=num_labels)
    BertForSequenceClassification(config).eval().save_pretrained(path)
    tokenizer.model_max_length = max_positions
    tokenizer.save_pretrained(path)
    return path
