"""Sequence classifiers that give the probabilities APC needs, batched and length-safe."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class DiscriminatorError(ValueError):
    """A discriminator checkpoint that cannot serve the role it was given."""


class Discriminator:
    """Wraps an ``AutoModelForSequenceClassification`` whose classes are ``labels``, in that order.

    ``probabilities`` softmaxes the logits of texts ``batch_size`` at a time. Texts longer than the
    model's maximum length are truncated (with a warning), never an error. ``calls`` counts forward
    passes and ``texts_scored`` the texts they held, so callers can check caching.
    """

    def __init__(self, model, tokenizer, labels: Sequence[str], batch_size: int = 32, max_length: int | None = None,
                 name: str = "discriminator"):
        num_labels = model.config.num_labels
        if num_labels != len(labels):
            raise DiscriminatorError(f"{name} has {num_labels} output labels {_label_names(model)}, "
                                     f"but this role needs {len(labels)}: {list(labels)}")
        self.model, self.tokenizer, self.labels, self.batch_size, self.name = model.eval(), tokenizer, tuple(labels), batch_size, name
        self.max_length = max_length or model_max_length(model, tokenizer)
        self.calls = 0
        self.texts_scored = 0

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, labels: Sequence[str], device: str | None = None,
                        batch_size: int = 32, max_length: int | None = None) -> Discriminator:
        """Load a local checkpoint directory (nothing is downloaded): a sequence classifier, or a frozen encoder
        with a trained head (``personafuse.apc.frozen``, which has the same ``probabilities``)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"discriminator checkpoint {path} has no config.json")
        if "personafuse_discriminator" in json.loads((path / "config.json").read_text()):
            from personafuse.apc.frozen import FrozenEncoderDiscriminator

            return FrozenEncoderDiscriminator.from_pretrained(path, labels, device, batch_size)
        model = AutoModelForSequenceClassification.from_pretrained(path)
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model, AutoTokenizer.from_pretrained(path), labels, batch_size, max_length, name=str(path))

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        """``[len(texts), len(labels)]`` class probabilities (float32, CPU)."""
        if not texts:
            return torch.empty(0, len(self.labels))
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start:start + self.batch_size])
            self._warn_if_truncated(chunk)
            batch = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt").to(device)
            logits = self.model(**batch).logits
            out.append(logits.float().softmax(-1).cpu())
            self.calls += 1
            self.texts_scored += len(chunk)
        return torch.cat(out)

    def _warn_if_truncated(self, texts: list[str]) -> None:
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        longest = max(lengths)
        if longest > self.max_length:
            n = sum(length > self.max_length for length in lengths)
            log.warning("%s: %d input(s) longer than %d tokens (longest %d) were truncated; the end of the "
                        "response is not seen", self.name, n, self.max_length, longest)


def model_max_length(model, tokenizer) -> int:
    """The smaller of the tokenizer's and the position embeddings' limits (tokenizers often say 1e30)."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(limits) if limits else 512


def _label_names(model) -> list[str]:
    return [model.config.id2label[i] for i in range(model.config.num_labels)] if model.config.id2label else []
