"""Distil a relevance or NLI discriminator from labelled rows (the paper: AdamW, lr 1e-5)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import DataCollatorWithPadding, Trainer

from personafuse.apc.discriminators import model_max_length
from personafuse.apc.labels import spec
from personafuse.training.checkpointing import AtomicCheckpointMixin


class DiscriminatorTrainer(AtomicCheckpointMixin, Trainer):
    """``transformers.Trainer`` (AdamW) with atomic checkpoints and an optionally class-weighted cross-entropy."""

    def __init__(self, *args, class_weights: torch.Tensor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_weights = class_weights

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.class_weights is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = torch.nn.functional.cross_entropy(outputs.logits.float(), labels,
                                                 weight=self.class_weights.to(outputs.logits.device))
        return (loss, outputs) if return_outputs else loss


def balanced_class_weights(rows: Sequence[dict], kind: str) -> torch.Tensor:
    """``n / (classes * count)`` per label (sklearn's "balanced"); a label with no rows gets weight 0."""
    labels = spec(kind).labels
    counts = [sum(r["label"] == label for r in rows) for label in labels]
    return torch.tensor([len(rows) / (len(labels) * c) if c else 0.0 for c in counts])


def split_rows(rows: Sequence[dict], heldout_fraction: float, seed: int = 0,
               group_by: Sequence[str] = ("character", "query")) -> tuple[list[dict], list[dict]]:
    """Hold out ``heldout_fraction`` of the rows as whole groups (a seeded shuffle of the groups).

    Rows sharing ``group_by`` stay on one side: the authored expansion labels one query's entailed and
    contradicted replies against several statements, so a row-level split would train on the very
    replies it then tests. ``group_by=()`` splits single rows. At least one row lands on each side.
    """
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if len(rows) < 2:
        raise ValueError(f"need at least 2 labelled rows to hold some out, got {len(rows)}")
    groups: dict[tuple, list[dict]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(tuple(row[k] for k in group_by) if group_by else (i,), []).append(row)
    if len(groups) < 2:
        raise ValueError(f"need at least 2 groups by {list(group_by)} to hold some out, got {len(groups)}")
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    target = min(len(rows) - 1, max(1, round(len(rows) * heldout_fraction)))
    heldout: list[dict] = []
    while len(heldout) < target and len(order) > 1:
        heldout = order.pop() + heldout
    return [r for group in order for r in group], heldout


def init_discriminator(init_path: str | Path, kind: str, freeze_embeddings: bool = False, log=print):
    """(model, tokenizer): a fresh classification head with the kind's labels on a local encoder checkpoint.

    ``freeze_embeddings`` keeps the token embeddings fixed: on a few hundred labelled rows they barely
    move, and on MiniLM they are half the parameters, so AdamW's update of them is a third of a step.
    transformers' LOAD REPORT table for the head we create on purpose is replaced by one line via ``log``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    labels = spec(kind).labels
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            init_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={x: i for i, x in enumerate(labels)}, ignore_mismatched_sizes=True, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
    fresh = sorted({*info.get("missing_keys", ()), *(k for k, *_ in info.get("mismatched_keys", ()))})
    log(f"[discriminator] {kind}: new {len(labels)}-label head ({', '.join(labels)}) on {init_path}; "
        f"initialised fresh: {', '.join(fresh) or 'nothing'}")
    if freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(init_path)


class LabelledDataset(torch.utils.data.Dataset):
    def __init__(self, rows: Sequence[dict], kind: str, tokenizer, max_length: int):
        s = spec(kind)
        self.items = [{**tokenizer(s.text(r), truncation=True, max_length=max_length), "labels": s.labels.index(r["label"])}
                      for r in rows]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def accuracy(disc, rows: Sequence[dict], kind: str) -> dict[str, float]:
    """Held-out accuracy overall and per gold label of a discriminator (``probabilities(texts)``, as APC scores)."""
    s = spec(kind)
    predicted = disc.probabilities([s.text(r) for r in rows]).argmax(-1).tolist()
    hits = [s.labels[p] == r["label"] for p, r in zip(predicted, rows, strict=True)]
    report = {"accuracy": sum(hits) / len(hits), "rows": len(rows)}
    for label in s.labels:
        mine = [h for h, r in zip(hits, rows, strict=True) if r["label"] == label]
        if mine:
            report[f"accuracy_{label}"] = sum(mine) / len(mine)
    return report


def train_discriminator(model, tokenizer, train_rows: Sequence[dict], kind: str, args,
                        resume_from_checkpoint: str | None = None, balance_classes: bool = False) -> DiscriminatorTrainer:
    """Fine-tune ``model`` on ``train_rows`` with the ``transformers.TrainingArguments`` ``args``.

    ``balance_classes`` weights the loss by :func:`balanced_class_weights`: the authored expansion gives
    NLI two neutral rows per entailed or contradicted one, and an unweighted head learns to say neutral.
    """
    dataset = LabelledDataset(train_rows, kind, tokenizer, model_max_length(model, tokenizer))
    trainer = DiscriminatorTrainer(model=model, args=args, train_dataset=dataset,
                                   data_collator=DataCollatorWithPadding(tokenizer),
                                   class_weights=balanced_class_weights(train_rows, kind) if balance_classes else None)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    model.eval()
    return trainer
