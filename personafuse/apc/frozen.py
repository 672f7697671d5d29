"""APC discriminators on a frozen sentence encoder: mismatch features and a small trained head.

Fine-tuning MiniLM as a cross-encoder on the authored rows does not learn contradictions within a CPU
budget (``data/DISCRIMINATORS.md``: contradicted 0.09). Here the encoder stays frozen and reads each field
(statement, query, response) on its own, so every distinct text is encoded once and cached. What is
trained is a small MLP over features of how the texts of each pair line up: sentence cosine, token
alignment (how much of one text finds a close token in the other), shared and new content words,
numbers and capitalised names on either side, and negation on either side. A contradiction keeps the
statement's topic but changes a detail or the polarity; a neutral reply does not touch the topic.

Saved as ``config.json`` (``"personafuse_discriminator": "frozen_encoder_head"``), ``head.safetensors``
and the encoder with its tokenizer in ``encoder/``; :meth:`Discriminator.from_pretrained
<personafuse.apc.discriminators.Discriminator.from_pretrained>` loads either kind of checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from personafuse.apc.discriminators import DiscriminatorError
from personafuse.apc.labels import spec
from personafuse.apc.templates import parse_text

log = logging.getLogger(__name__)

ARCHITECTURE = "frozen_encoder_head"


def _vocabulary(text: str) -> frozenset[str]:
    return frozenset(text.split())


PAIRS = {"relevance": (("statement", "query"),),
         "nli": (("statement", "response"), ("query", "response"), ("statement", "query"))}
NEGATIONS = _vocabulary("no not never nothing none nobody nowhere neither nor cannot without refuse refuses refused "
                        "hate hates hated nope")
NUMBER_WORDS = _vocabulary("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                           "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety "
                           "hundred thousand million once twice dozen half")
STOPWORDS = _vocabulary(
    "a an the and or but if so of to in on at by for with from about as into over after before than then that this these "
    "those there here it its it's i i'm i've i'd i'll me my mine you your yours he him his she her hers we us our they "
    "them their is am are was were be been being do does did have has had will would can could should may might must "
    "what which who whom whose when where why how all any some each every very just really quite also too still even "
    "up down out off again more most much many such only own same s t re ve ll d m oh ah well yes yeah")
_WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)?")
_SENTENCE_START = re.compile(r"(?:^|[.!?]\s+|[\"“(]\s*)$")


@dataclass(frozen=True)
class HeadConfig:
    """The trained part of a :class:`FrozenEncoderDiscriminator`.

    Args:
        kind: ``relevance`` or ``nli`` (which fields are compared, :data:`PAIRS`).
        hidden: width of the MLP's hidden layer.
        dropout: dropout before the output layer (training only).
        vectors: also feed each pair's sentence-vector product and absolute difference (2 x hidden size of the
            encoder per pair); more capacity, more to overfit on a few hundred rows.
        max_length: tokens per field; longer fields are truncated with a warning.
    """

    kind: str
    hidden: int = 64
    dropout: float = 0.1
    vectors: bool = False
    max_length: int = 128

    def __post_init__(self):
        spec(self.kind)
        if self.hidden < 1 or not 0 <= self.dropout < 1 or self.max_length < 4:
            raise ValueError(f"head config needs hidden >= 1, dropout in [0, 1), max_length >= 4; got {self}")


@dataclass
class _Encoded:
    states: torch.Tensor  # [L, d] last hidden states, L2-normalised, special tokens dropped
    content: torch.Tensor  # [L] bool: not punctuation, a stopword or a character-name piece
    sentence: torch.Tensor  # [d] mean-pooled over all tokens (sentence-transformers), L2-normalised


class FeatureHead(nn.Module):
    """Standardise the features (training statistics kept as buffers), then a one-hidden-layer MLP."""

    def __init__(self, in_features: int, hidden: int, num_labels: int, dropout: float):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_labels))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std)


def words(text: str) -> list[tuple[str, bool]]:
    """(lowercased word, capitalised and not at a sentence start) for each word of ``text``."""
    out = []
    for m in _WORD.finditer(text):
        w = m.group().replace("’", "'")
        starts = _SENTENCE_START.search(text[:m.start()]) is not None
        out.append((w.lower(), w[0].isupper() and not starts and w.lower() not in STOPWORDS))
    return out


def _lexical(text: str, name: set[str]) -> dict[str, set[str] | int]:
    ws = [(w, cap) for w, cap in words(text) if w not in name]
    base = [w[:-2] if w.endswith("'s") else w for w, _ in ws]
    return {"content": {w for w in base if w not in STOPWORDS and not w.isdigit() and w not in NUMBER_WORDS},
            "numbers": {w for w in base if w.isdigit() or w in NUMBER_WORDS},
            "caps": {w for (_, cap), w in zip(ws, base, strict=True) if cap},
            "negations": sum(w in NEGATIONS or w.endswith("n't") for w, _ in ws)}


def _overlap(a: set[str], b: set[str]) -> list[float]:
    """a non-empty, b non-empty, share something, b adds something a lacks, a has something b lacks."""
    return [float(bool(a)), float(bool(b)), float(bool(a & b)), float(bool(b - a)), float(bool(a - b))]


def _alignment(a: _Encoded, b: _Encoded) -> list[float]:
    """How well a's content tokens find a close token in b: mean, min and the share above 0.9 and 0.7."""
    sa, sb = a.states[a.content], b.states[b.content]
    if not len(sa) or not len(sb):
        return [0.0, 0.0, 0.0, 0.0]
    best = (sa @ sb.T).max(-1).values
    return [best.mean().item(), best.min().item(), (best > 0.9).float().mean().item(), (best > 0.7).float().mean().item()]


def pair_features(a: _Encoded, b: _Encoded, la: dict, lb: dict) -> list[float]:
    """The hand features of one (a, b) pair: 4 + 4 + 1 + 3 + 5 + 5 + 3 = 25 numbers."""
    shared = la["content"] & lb["content"]
    return [*_alignment(a, b), *_alignment(b, a), float(a.sentence @ b.sentence),
            len(shared) / max(len(la["content"]), 1), len(shared) / max(len(lb["content"]), 1),
            math.log1p(len(lb["content"] - la["content"])),
            *_overlap(la["numbers"], lb["numbers"]), *_overlap(la["caps"], lb["caps"]),
            float(la["negations"] > 0), float(lb["negations"] > 0), float((la["negations"] > 0) != (lb["negations"] > 0))]


class FrozenEncoderDiscriminator:
    """A frozen encoder plus a :class:`FeatureHead`, with :class:`~personafuse.apc.discriminators.Discriminator`'s
    interface: ``probabilities(texts)`` over ``labels`` for texts built by ``templates.{kind}_text``.

    Each distinct field text is encoded once and cached (``cache_size`` texts, oldest dropped first):
    APC scoring repeats every statement and query across many responses.
    """

    def __init__(self, encoder, tokenizer, config: HeadConfig, head: FeatureHead | None = None, batch_size: int = 32,
                 name: str = "discriminator", cache_size: int = 65536):
        self.encoder, self.tokenizer, self.config = encoder.eval().requires_grad_(False), tokenizer, config
        self.labels = spec(config.kind).labels
        self.head = (head or FeatureHead(self.num_features, config.hidden, len(self.labels), config.dropout)).eval()
        self.batch_size, self.name, self.cache_size = batch_size, name, cache_size
        self.calls = 0
        self.texts_scored = 0
        self._cache: dict[tuple[str, str], _Encoded] = {}
        self._skip = {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
        self._stop = {i for w in STOPWORDS for i in [tokenizer.convert_tokens_to_ids(w)] if i != tokenizer.unk_token_id}

    @property
    def num_features(self) -> int:
        per_pair = 25 + (2 * self.encoder.config.hidden_size if self.config.vectors else 0)
        return per_pair * len(PAIRS[self.config.kind])

    @classmethod
    def from_encoder(cls, path: str | os.PathLike, config: HeadConfig, batch_size: int = 32, seed: int = 0,
                     name: str | None = None) -> FrozenEncoderDiscriminator:
        """A fresh head (seeded) on the encoder checkpoint at ``path`` (any ``AutoModel``; a classifier's head is ignored)."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # loading a classifier checkpoint as a bare encoder reports its unused head
        try:
            encoder = AutoModel.from_pretrained(path)
        finally:
            hf_logging.set_verbosity(level)
        tokenizer = AutoTokenizer.from_pretrained(path)
        disc = cls(encoder, tokenizer, config, batch_size=batch_size, name=name or f"{config.kind} discriminator")
        torch.manual_seed(seed)
        disc.head = FeatureHead(disc.num_features, config.hidden, len(disc.labels), config.dropout).eval()
        return disc

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, labels: Sequence[str] | None = None, device: str | None = None,
                        batch_size: int = 32) -> FrozenEncoderDiscriminator:
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        meta = json.loads((path / "config.json").read_text())
        if meta.get("personafuse_discriminator") != ARCHITECTURE:
            raise DiscriminatorError(f"{path}/config.json is not a {ARCHITECTURE} checkpoint")
        config = HeadConfig(**meta["head"])
        if labels is not None and len(labels) != len(spec(config.kind).labels):
            raise DiscriminatorError(f"{path} is a {config.kind} discriminator with labels {list(spec(config.kind).labels)}, "
                                     f"but this role needs {len(labels)}: {list(labels)}")
        encoder = AutoModel.from_pretrained(path / "encoder").to(device or "cpu")
        disc = cls(encoder, AutoTokenizer.from_pretrained(path / "encoder"), config, batch_size=batch_size, name=str(path))
        state = load_file(path / "head.safetensors")
        disc.head = FeatureHead(state["mean"].numel(), config.hidden, len(disc.labels), config.dropout)
        disc.head.load_state_dict(state)
        disc.head.to(device or "cpu").eval()
        if disc.head.mean.numel() != disc.num_features:
            raise DiscriminatorError(f"{path}/head.safetensors takes {disc.head.mean.numel()} features, "
                                     f"but its config gives {disc.num_features}")
        return disc

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write into the existing directory ``path`` (callers make it atomic: ``checkpoint.atomic_dir``)."""
        path = Path(path)
        self.encoder.save_pretrained(path / "encoder")
        self.tokenizer.save_pretrained(path / "encoder")
        save_file({k: v.contiguous().cpu() for k, v in self.head.state_dict().items()}, path / "head.safetensors")
        (path / "config.json").write_text(json.dumps({"personafuse_discriminator": ARCHITECTURE, "labels": list(self.labels),
                                                      "head": asdict(self.config)}, indent=2))

    @torch.no_grad()
    def _encode(self, texts: Sequence[str], name_words: set[str]) -> list[_Encoded]:
        device = next(self.encoder.parameters()).device
        key = " ".join(sorted(name_words))
        missing = [t for t in dict.fromkeys(texts) if (key, t) not in self._cache]
        name_ids = {i for w in name_words for i in self.tokenizer(w, add_special_tokens=False)["input_ids"]}
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            batch = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.config.max_length,
                                   return_tensors="pt")
            if any(len(ids) > self.config.max_length for ids in self.tokenizer(chunk)["input_ids"]):
                log.warning("%s: a field longer than %d tokens was truncated", self.name, self.config.max_length)
            hidden = self.encoder(**batch.to(device)).last_hidden_state.float().cpu()
            mask = batch["attention_mask"].cpu().bool()
            for text, h, m, ids in zip(chunk, hidden, mask, batch["input_ids"].cpu(), strict=True):
                h, ids = h[m], ids[m]
                pieces = self.tokenizer.convert_ids_to_tokens(ids.tolist())
                keep = torch.tensor([i not in self._skip for i in ids.tolist()])
                content = torch.tensor([i not in self._stop and i not in name_ids and any(c.isalnum() for c in p)
                                        for i, p in zip(ids.tolist(), pieces, strict=True)])
                sentence = nn.functional.normalize(h.mean(0), dim=-1)
                states = nn.functional.normalize(h, dim=-1)
                self._cache[(key, text)] = _Encoded(states[keep], content[keep], sentence)
        while len(self._cache) > self.cache_size:
            self._cache.pop(next(iter(self._cache)))
        return [self._cache[(key, t)] for t in texts]

    def features(self, rows: Sequence[dict[str, str]]) -> torch.Tensor:
        """``[len(rows), num_features]`` for rows with the kind's fields (labels.py)."""
        fields = sorted({f for pair in PAIRS[self.config.kind] for f in pair})
        by_character: dict[str, list[str]] = {}
        for row in rows:  # encode every new text first, in full batches
            by_character.setdefault(row["character"], []).extend(row[f] for f in fields)
        for character, texts in by_character.items():
            self._encode(texts, {w for w, _ in words(character)})
        out = []
        for row in rows:
            name = {w for w, _ in words(row["character"])}
            encoded = dict(zip(fields, self._encode([row[f] for f in fields], name), strict=True))
            lexical = {f: _lexical(row[f], name) for f in fields}
            feats = []
            for a, b in PAIRS[self.config.kind]:
                feats += pair_features(encoded[a], encoded[b], lexical[a], lexical[b])
                if self.config.vectors:
                    u, v = encoded[a].sentence, encoded[b].sentence
                    feats += (u * v).tolist() + (u - v).abs().tolist()
            out.append(feats)
        return torch.tensor(out, dtype=torch.float32).reshape(len(rows), self.num_features)

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        """``[len(texts), len(labels)]`` class probabilities (float32, CPU)."""
        if not texts:
            return torch.empty(0, len(self.labels))
        rows = [parse_text(self.config.kind, t) for t in texts]
        out = []
        for start in range(0, len(rows), self.batch_size):
            feats = self.features(rows[start:start + self.batch_size]).to(self.head.mean.device)
            out.append(self.head(feats).float().softmax(-1).cpu())
            self.calls += 1
        self.texts_scored += len(texts)
        return torch.cat(out)


@dataclass(frozen=True)
class HeadTraining:
    """Full-batch AdamW on the cached features.

    Args:
        epochs: optimizer steps (each sees every training row).
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        balance_classes: weight the loss by ``distill.balanced_class_weights``.
    """

    epochs: int = 400
    learning_rate: float = 3e-3
    weight_decay: float = 1e-2
    balance_classes: bool = True

    def __post_init__(self):
        if self.epochs < 1 or self.learning_rate <= 0 or self.weight_decay < 0:
            raise ValueError(f"head training needs epochs >= 1, learning_rate > 0, weight_decay >= 0; got {self}")


def train_head(disc: FrozenEncoderDiscriminator, rows: Sequence[dict[str, str]], training: HeadTraining,
               seed: int = 0) -> list[float]:
    """Fit ``disc.head`` on ``rows`` (features computed once); returns the loss of every step."""
    from personafuse.apc.distill import balanced_class_weights

    feats = disc.features(rows)
    labels = torch.tensor([disc.labels.index(r["label"]) for r in rows])
    std = feats.std(0)
    torch.manual_seed(seed)
    head = FeatureHead(feats.shape[1], disc.config.hidden, len(disc.labels), disc.config.dropout)
    head.mean.copy_(feats.mean(0))
    head.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))  # constant features pass through as 0
    weights = balanced_class_weights(rows, disc.config.kind) if training.balance_classes else None
    optimizer = torch.optim.AdamW(head.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay)
    losses = []
    head.train()
    for _ in range(training.epochs):
        loss = nn.functional.cross_entropy(head(feats), labels, weight=weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    disc.head = head.eval()
    return losses
