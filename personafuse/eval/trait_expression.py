"""Suite 1, trait expression: which Big Five traits does a reply express, and do they match the situation?

Input: situations in the PersonaFuse format (``personafuse/data/schema.py``); the bundled held-out split
is the sample. Each candidate answers every situation; a trait scorer rates each reply on every trait in
[-1, 1] (+1 the high pole, -1 the low pole), and the ratings are compared with the situation's target
activations.

Two scorers:

* :class:`TraitClassifier` (offline): one logistic regression per trait on all-MiniLM-L6-v2 sentence
  embeddings, distilled from the pole-labelled replies of the training situations
  (``responses["<trait>_high"]`` vs ``responses["<trait>_low"]``). Its held-out pole accuracy is reported
  as its validity check.
* :class:`JudgeTraitScorer`: an LLM judge with a Big Five rubric, through any chat generator.

Metrics (:func:`trait_agreement`): per-trait Pearson r between expressed and target activations across
situations; top-trait accuracy (the most strongly expressed trait is the one the situation calls for most);
pole agreement (on the situation's top trait, the expressed sign matches the target's); mean cosine between
the expressed and target vectors, with a bootstrap interval.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from personafuse.checkpoint import CheckpointError, read_safetensors
from personafuse.data import Situation
from personafuse.data.generators import ChatGenerator
from personafuse.data.synthesize import AnnotationError, parse_activations
from personafuse.eval.candidates import Candidate, GenerationSettings, cached_generate
from personafuse.eval.io import ResultFile
from personafuse.eval.judges import ParseTally
from personafuse.eval.metrics import bootstrap_ci, mean, pearson, top_index_accuracy
from personafuse.traits import BIG_FIVE, TraitSet


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings (default: the bundled all-MiniLM-L6-v2)."""

    def __init__(self, path: str | os.PathLike | None = None, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        from personafuse.context import bundled_sentence_encoder_path

        path = path or bundled_sentence_encoder_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                   max_length=256, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


class TraitClassifier:
    """Per-trait logistic regressions on sentence embeddings; ``score`` gives ``2 P(high) - 1`` per trait."""

    def __init__(self, traits: Sequence[str], weight: torch.Tensor, bias: torch.Tensor, encoder=None):
        self.traits, self.weight, self.bias = tuple(traits), weight, bias
        self.encoder = encoder if encoder is not None else SentenceEncoder()
        self.fit_info: dict = {}

    @classmethod
    def fit(cls, situations: Sequence[Situation], traits: TraitSet = BIG_FIVE, encoder=None, l2: float | None = None,
            iterations: int = 100, folds: int = 5) -> TraitClassifier:
        """Distil from the pole replies of ``situations`` (both poles of a trait must be present).

        ``l2=None`` picks the penalty from :data:`L2_GRID` by held-out log-likelihood over ``folds``
        situation-grouped folds: a fixed penalty that is too strong squeezes even the authored pole replies
        to scores near 0, and every shift measured on that scale with them. ``fit_info`` keeps the choice.
        """
        encoder = encoder if encoder is not None else SentenceEncoder()
        texts, labels, trait_index, groups = [], [], [], []
        for g, s in enumerate(situations):
            for i, trait in enumerate(traits.traits):
                for pole, label in (("high", 1.0), ("low", 0.0)):
                    reply = s.responses.get(f"{trait}_{pole}")
                    if reply is not None:
                        texts.append(reply)
                        labels.append(label)
                        trait_index.append(i)
                        groups.append(g)
        if not texts:
            raise ValueError("no pole-labelled replies to distil the trait classifier from")
        x, y, t = encoder(texts).float(), torch.tensor(labels), torch.tensor(trait_index)
        n_traits = len(traits.traits)
        info: dict = {"l2": l2, "cross_validated": False}
        if l2 is None:
            info = _select_l2(x, y, t, torch.tensor(groups), n_traits, iterations, folds)
        weight, bias = _fit_logistic(x, y, t, n_traits, info["l2"], iterations)
        classifier = cls(traits.traits, weight, bias, encoder)
        classifier.fit_info = info
        return classifier

    def score(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, T]`` expressed activations in [-1, 1]."""
        x = self.encoder(list(texts)).float()
        return 2 * torch.sigmoid(x @ self.weight.T + self.bias) - 1

    def pole_scores(self, situations: Sequence[Situation]) -> dict[str, torch.Tensor]:
        """Per pole, its replies' own-trait scores signed toward the pole (+1: fully that pole)."""
        texts, signs, index, names = [], [], [], []
        for s in situations:
            for i, trait in enumerate(self.traits):
                for pole, sign in (("high", 1), ("low", -1)):
                    if f"{trait}_{pole}" in s.responses:
                        texts.append(s.responses[f"{trait}_{pole}"])
                        signs.append(sign)
                        index.append(i)
                        names.append(f"{trait}_{pole}")
        if not texts:
            return {}
        signed = self.score(texts)[torch.arange(len(texts)), torch.tensor(index)] * torch.tensor(signs, dtype=torch.float32)
        return {name: signed[[j for j, n in enumerate(names) if n == name]] for name in dict.fromkeys(names)}

    def pole_accuracy(self, situations: Sequence[Situation]) -> float | None:
        """Share of pole replies whose own trait is scored on the right side of 0 (the validity check)."""
        signed = self.pole_scores(situations)
        if not signed:
            return None
        return float((torch.cat(list(signed.values())) > 0).float().mean())

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, path,
                  metadata={"traits": ",".join(self.traits)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, encoder=None) -> TraitClassifier:
        from safetensors import safe_open

        tensors = read_safetensors(Path(path))
        with safe_open(str(path), "pt") as f:
            traits = (f.metadata() or {}).get("traits")
        if not traits or set(tensors) != {"weight", "bias"}:
            raise CheckpointError(f"{path}: not a TraitClassifier file (needs 'traits' metadata, weight and bias)")
        return cls(traits.split(","), tensors["weight"], tensors["bias"], encoder)


L2_GRID = (1e-2, 1e-3, 1e-4, 1e-5)
"""Penalties (on the summed squared weights) that :meth:`TraitClassifier.fit` cross-validates."""


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, n_traits: int, l2: float,
                  iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and biases of one L2-penalised logistic regression per trait (row ``i`` belongs to trait ``t[i]``)."""
    weight = torch.zeros(n_traits, x.shape[1], requires_grad=True)
    bias = torch.zeros(n_traits, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = (x * weight[t]).sum(-1) + bias[t]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _select_l2(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, groups: torch.Tensor, n_traits: int,
               iterations: int, folds: int) -> dict:
    """The :data:`L2_GRID` value with the best mean held-out log-likelihood, folds split by situation (seeded)."""
    unique = torch.unique(groups)
    folds = min(folds, len(unique))
    if folds < 2:
        return {"l2": L2_GRID[1], "cross_validated": False, "reason": "fewer than 2 situations"}
    shuffled = unique[torch.randperm(len(unique), generator=torch.Generator().manual_seed(0))]
    fold_of = {int(g): i % folds for i, g in enumerate(shuffled)}
    fold = torch.tensor([fold_of[int(g)] for g in groups])
    scores = {}
    for l2 in L2_GRID:
        total = 0.0
        for k in range(folds):
            train, test = fold != k, fold == k
            weight, bias = _fit_logistic(x[train], y[train], t[train], n_traits, l2, iterations)
            logits = (x[test] * weight[t[test]]).sum(-1) + bias[t[test]]
            total -= float(torch.nn.functional.binary_cross_entropy_with_logits(logits, y[test], reduction="sum"))
        scores[l2] = total / len(y)
    best = max(scores, key=scores.get)
    return {"l2": best, "cross_validated": True, "folds": folds,
            "heldout_log_likelihood": {f"{l2:g}": round(v, 4) for l2, v in scores.items()}}


def judge_prompt(reply: str, context: Sequence[dict], traits: TraitSet = BIG_FIVE) -> list[dict]:
    """The Big Five rubric: rate how strongly the reply expresses each trait's high or low pole."""
    scale = "\n".join(f'- "{t}": +1 = {", ".join(traits.markers_of(f"{t}_high"))}; '
                      f'-1 = {", ".join(traits.markers_of(f"{t}_low"))}' for t in traits.traits)
    transcript = "\n".join(f"{m['role']}: {m['content']}" for m in context)
    keys = ", ".join(f'"{t}"' for t in traits.traits)
    return [
        {"role": "system", "content": "You rate the personality a reply expresses, using the Big Five model."},
        {"role": "user", "content": f"Conversation:\n{transcript}\n\nReply to rate:\n{reply}\n\n"
                                    f"Score how strongly the reply expresses each trait, from -1 to 1:\n{scale}\n"
                                    f"0 means the reply shows neither pole. Answer with only a JSON object with "
                                    f"exactly the keys {keys} and numbers as values."},
    ]


class JudgeTraitScorer:
    """An LLM judge with the Big Five rubric; unparsable replies are counted and give a NaN row."""

    def __init__(self, generator: ChatGenerator, traits: TraitSet = BIG_FIVE, max_new_tokens: int = 128):
        self.generator, self.trait_set, self.max_new_tokens = generator, traits, max_new_tokens
        self.traits = traits.traits
        self.tally = ParseTally()

    def score(self, texts: Sequence[str], contexts: Sequence[Sequence[dict]] | None = None) -> torch.Tensor:
        contexts = contexts or [[{"role": "user", "content": "(no context)"}]] * len(texts)
        replies = self.generator.generate([judge_prompt(t, c, self.trait_set) for t, c in zip(texts, contexts, strict=True)],
                                          temperature=0, max_new_tokens=self.max_new_tokens)
        rows = []
        for reply in replies:
            try:
                found = parse_activations(reply, self.trait_set)
            except AnnotationError:
                found = None
            self.tally.add(found, reply)
            rows.append([found[t] for t in self.traits] if found else [float("nan")] * len(self.traits))
        return torch.tensor(rows, dtype=torch.float32).reshape(len(texts), len(self.traits))


def trait_agreement(expressed, target, traits: Sequence[str], confidence: float = 0.95, seed: int = 0) -> dict:
    """Agreement of expressed ``[N, T]`` with target ``[N, T]`` activations; rows with NaN are excluded."""
    expressed, target = np.asarray(expressed, dtype=np.float64), np.asarray(target, dtype=np.float64)
    keep = ~np.isnan(expressed).any(-1)
    expressed, target = expressed[keep], target[keep]
    per_trait = {t: pearson(expressed[:, i], target[:, i]) for i, t in enumerate(traits)}
    rows = np.arange(len(target))
    top = np.abs(target).argmax(-1) if len(target) else np.zeros(0, dtype=int)
    pole = float((np.sign(expressed[rows, top]) == np.sign(target[rows, top])).mean()) if len(target) else None
    norms = np.linalg.norm(expressed, axis=-1) * np.linalg.norm(target, axis=-1)
    cosine = np.where(norms > 0, (expressed * target).sum(-1) / np.maximum(norms, 1e-12), 0.0)
    low, high = bootstrap_ci(cosine, confidence=confidence, seed=seed)
    return {"n": int(keep.sum()), "excluded": int((~keep).sum()), "per_trait_pearson": per_trait,
            "mean_pearson": mean(per_trait.values()), "top_trait_accuracy": top_index_accuracy(expressed, target),
            "pole_agreement": pole, "cosine": float(cosine.mean()) if len(cosine) else None,
            "cosine_ci": [low, high] if len(cosine) else None}


def evaluate_trait_expression(candidates: Sequence[Candidate], situations: Sequence[Situation], scorer,
                              store: ResultFile, settings: GenerationSettings, traits: TraitSet = BIG_FIVE,
                              include_reference: bool = True, progress: bool = True) -> dict:
    """``{"candidates": {name: trait_agreement + replies + expressed}, ...}``; ``reference`` scores the data's own
    blended ``response`` field (a ceiling for the scorer), where the situations have one."""
    ids = [s.id for s in situations]
    target = torch.stack([s.activation_vector(traits) for s in situations]).float().numpy()
    contexts = [s.situation for s in situations]
    results = {"candidates": {}, "target_activations": target.tolist(), "ids": ids}
    answers = {c.name: cached_generate(store, c, ids, contexts, settings, progress, f"trait expression: {c.name}")
               for c in candidates}
    if include_reference and all(s.response for s in situations):
        answers["reference"] = [s.response for s in situations]
    for name, replies in answers.items():
        expressed = _score(scorer, replies, contexts)
        results["candidates"][name] = {**trait_agreement(expressed, target, traits.traits), "replies": replies,
                                       "expressed": expressed.tolist()}
    if isinstance(scorer, JudgeTraitScorer):
        results["judge"] = scorer.tally.to_dict()
    return results


def _score(scorer, replies: Sequence[str], contexts) -> np.ndarray:
    if isinstance(scorer, JudgeTraitScorer):
        return scorer.score(replies, contexts).numpy()
    return scorer.score(replies).numpy()
