"""APC-DPO pieces: sample n responses per query, score them with APC, pair best against worst,
and a DPO trainer that routes the PersonaFuse model on the prompt only, as generation does."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, load_from_disk
from trl import DPOTrainer

from personafuse.apc.personas import Persona
from personafuse.apc.score import APCResult, APCScorer, persona_system_prompt
from personafuse.checkpoint import atomic_dir
from personafuse.data.generators import ChatGenerator, HFChatGenerator
from personafuse.data.schema import DataError, read_jsonl
from personafuse.eval.metrics import paired_delta
from personafuse.training.checkpointing import AtomicCheckpointMixin, BundleCheckpointMixin

log = logging.getLogger(__name__)
QUERY_FIELDS = ("character", "query", "split")
SYSTEM_PROMPTS = ("all", "retrieved", "none")


def load_queries(path: str | os.PathLike, character: str | None = None, split: str | None = None) -> list[str]:
    """User queries from JSONL lines ``{"character", "query", "split": "train" | "heldout"}``, filtered."""
    queries = []
    for lineno, record in read_jsonl(path):
        try:
            if sorted(record) != sorted(QUERY_FIELDS):
                raise DataError(f"expected an object with exactly {list(QUERY_FIELDS)}, got {record!r}")
            for name in QUERY_FIELDS:
                if not isinstance(record[name], str) or not record[name].strip():
                    raise DataError(f"expected a non-empty string, got {record[name]!r}", field=name)
            if record["split"] not in ("train", "heldout"):
                raise DataError(f"expected 'train' or 'heldout', got {record['split']!r}", field="split")
        except DataError as e:
            raise e.at(path, lineno) from None
        if (character is None or record["character"] == character) and (split is None or record["split"] == split):
            queries.append(record["query"])
    if not queries:
        raise DataError(f"no queries for character={character!r}, split={split!r}", path=path)
    return queries


def build_pair(results: Sequence[APCResult], margin: float) -> tuple[APCResult, APCResult] | None:
    """(best, worst) by APC total, or None when the gap is not above ``margin``.

    Ties take the earliest sample as best and the latest as worst, so equal scores never pair
    (their gap is 0, never above a margin >= 0).
    """
    if len(results) < 2:
        return None
    best = max(results, key=lambda r: r.total)
    worst = min(reversed(results), key=lambda r: r.total)
    if best.total - worst.total <= margin:
        return None
    return best, worst


@dataclass
class PromptBuilder:
    """The conversation a query is answered in: the persona as system prompt (all statements, the top-k
    retrieved by relevance, or none), then the user's query."""

    persona: Persona
    scorer: APCScorer | None = None
    mode: str = "retrieved"
    top_k: int = 4

    def __post_init__(self):
        if self.mode not in SYSTEM_PROMPTS:
            raise ValueError(f"system_prompt must be one of {SYSTEM_PROMPTS}, got {self.mode!r}")
        if self.mode == "retrieved" and self.scorer is None:
            raise ValueError("system_prompt=retrieved needs a scorer (its relevance discriminator retrieves)")

    def __call__(self, query: str) -> list[dict[str, str]]:
        user = [{"role": "user", "content": query}]
        if self.mode == "none":
            return user
        statements = None
        if self.mode == "retrieved":
            statements = [s for s, _ in self.scorer.retrieve(self.persona, query, self.top_k)]
        return [{"role": "system", "content": persona_system_prompt(self.persona, statements)}, *user]


@dataclass(frozen=True)
class PersonaQuery:
    """One query a character answers and the conversation it is answered in; runs pool characters."""

    persona: Persona
    query: str
    conversation: list[dict[str, str]]

    @property
    def key(self) -> tuple[str, str]:
        return self.persona.character, self.query


def persona_queries(persona: Persona, queries: Sequence[str], prompt: Callable) -> list[PersonaQuery]:
    return [PersonaQuery(persona, q, prompt(q)) for q in dict.fromkeys(queries)]


def sample_responses(generator: ChatGenerator, conversations: Sequence[list[dict]], n: int, **sampling) -> list[list[str]]:
    """``n`` sampled replies per conversation (one batched call)."""
    flat = generator.generate([c for c in conversations for _ in range(n)], **sampling)
    return [flat[i * n:(i + 1) * n] for i in range(len(conversations))]


class PairFile:
    """The pairs JSONL, one line per query (kept or not) written as soon as it is scored; a rerun
    skips the queries already there. A line cut off by a killed run is dropped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            for i, line in enumerate(lines):
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    if i < len(lines) - 1:
                        raise DataError("invalid JSON in the pairs file", path=self.path, line=i + 1) from None
                    log.warning("%s: dropped a cut-off last line", self.path)
            self.path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records), encoding="utf-8")

    @property
    def done(self) -> set[tuple[str, str]]:
        """(character, query) of every query already scored: characters may share a query."""
        return {(r["character"], r["query"]) for r in self.records}

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
        self.records.append(record)

    def dpo_rows(self) -> list[dict]:
        """Conversational preference rows for TRL: prompt messages, chosen and rejected replies."""
        return [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in self.records if r["kept"]]


def make_pairs(pf, tokenizer, scorer: APCScorer, items: Sequence[PersonaQuery], pairs: PairFile, n: int = 4,
               margin: float = 0.2, batch_queries: int = 4, seed: int = 0, **sampling) -> PairFile:
    """Sample ``n`` replies per query from ``pf`` (routing at prefill), score, pair, append to ``pairs``.

    Queries of different characters share a batch: each conversation carries its own persona prompt.
    """
    if n < 2:
        raise ValueError(f"num_samples must be >= 2 to form a pair, got {n}")
    generator = HFChatGenerator(pf, tokenizer, batch_size=batch_queries * n, seed=seed)
    todo = [item for item in items if item.key not in pairs.done]
    for start in range(0, len(todo), batch_queries):
        chunk = todo[start:start + batch_queries]
        was_training = pf.training
        pf.eval()
        samples = sample_responses(generator, [item.conversation for item in chunk], n, **sampling)
        pf.train(was_training)
        for item, responses in zip(chunk, samples, strict=True):
            results = scorer.score(item.persona, item.query, responses)
            pair = build_pair(results, margin)
            pairs.append({"character": item.persona.character, "query": item.query, "prompt": item.conversation,
                          "responses": responses, "apc": [round(r.total, 6) for r in results], "kept": pair is not None,
                          "chosen": pair[0].response if pair else None, "rejected": pair[1].response if pair else None,
                          "margin": round(pair[0].total - pair[1].total, 6) if pair else None})
    return pairs


@torch.no_grad()
def greedy_apc(pf, tokenizer, scorer: APCScorer, items: Sequence[PersonaQuery], max_new_tokens: int = 48,
               batch_size: int = 8) -> list[APCResult]:
    """APC of the greedy reply to each query (the held-out report), in the order of ``items``."""
    was_training = pf.training
    pf.eval()
    generator = HFChatGenerator(pf, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=0)
    replies = generator.generate([item.conversation for item in items])
    pf.train(was_training)
    return [scorer.score_one(item.persona, item.query, reply) for item, reply in zip(items, replies, strict=True)]


def apc_comparison(items: Sequence[PersonaQuery], before: Sequence[APCResult], after: Sequence[APCResult]) -> dict:
    """Mean APC before and after on the same held-out queries, per character and pooled, with the paired
    bootstrap 95% interval of the change (the number that says whether APC-DPO helped)."""
    before_totals, after_totals = [r.total for r in before], [r.total for r in after]
    per_character: dict[str, dict] = {}
    for item, b, a in zip(items, before_totals, after_totals, strict=True):
        entry = per_character.setdefault(item.persona.character, {"before": [], "after": []})
        entry["before"].append(b)
        entry["after"].append(a)
    return {
        "heldout_queries": len(items),
        "mean_apc_before": float(np.mean(before_totals)) if items else float("nan"),
        "mean_apc_after": float(np.mean(after_totals)) if items else float("nan"),
        "change": paired_delta(after_totals, before_totals),
        "per_character": {name: {"n": len(v["before"]), "before": float(np.mean(v["before"])),
                                 "after": float(np.mean(v["after"]))} for name, v in per_character.items()},
    }


def preference_dataset(rows: Sequence[dict], cache_dir: str | os.PathLike) -> Dataset:
    """``rows`` as an Arrow dataset saved under ``cache_dir/<content hash>`` and memory-mapped from there.

    TRL caches the precomputed reference log-probs beside the dataset's files: for an in-memory dataset that is
    a per-process temporary folder the other ranks cannot read. Same rows, same folder: a rerun reuses both.
    Call it on the main process first (``main_process_first``) so one rank writes.
    """
    payload = json.dumps(list(rows), sort_keys=True, ensure_ascii=False).encode()
    target = Path(cache_dir) / hashlib.sha256(payload).hexdigest()[:16]
    if not (target / "dataset_info.json").is_file():
        with atomic_dir(target, overwrite=True, marker="dataset_info.json") as staging:
            Dataset.from_list(list(rows)).save_to_disk(str(staging))
    return load_from_disk(str(target))


def drop_overlong(rows: Sequence[dict], tokenizer, max_length: int | None) -> list[dict]:
    """Rows whose prompt leaves room for a reply within ``max_length`` (TRL silently drops the others)."""
    if max_length is None:
        return list(rows)
    kept = [r for r in rows
            if len(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)) < max_length]
    if len(kept) < len(rows):
        log.warning("%d of %d pairs dropped: their prompt alone fills max_length=%d", len(rows) - len(kept), len(rows), max_length)
    return kept


class PersonaDPOTrainer(BundleCheckpointMixin, AtomicCheckpointMixin, DPOTrainer):
    """TRL's DPO on a PersonaFuse model. The router reads the prompt tokens only (as at generation),
    not the chosen/rejected reply it is being scored on; the policy and a copied reference model
    each route with their own controller. Checkpoints hold the bundle, not a copy of the frozen base."""

    def __init__(self, *args, **kwargs):
        train_args = kwargs.get("args")
        if train_args is not None and train_args.ddp_find_unused_parameters is None:
            # not a PreTrainedModel: Trainer would pick find_unused_parameters=True (see RouterTrainer)
            train_args.ddp_find_unused_parameters = False
        super().__init__(*args, **kwargs)

    def _route_on_prompt(self, inputs: dict) -> None:
        prompt_mask = inputs["attention_mask"] * (1 - inputs["completion_mask"])
        for model in (self.model, self.ref_model):
            if model is not None:
                routing = getattr(self.accelerator.unwrap_model(model), "routing", None)
                if routing is not None:
                    routing.set_context_mask(prompt_mask)

    def compute_ref_log_probs(self, model, inputs):
        self._route_on_prompt(inputs)
        return super().compute_ref_log_probs(model, inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        self._route_on_prompt(inputs)
        return super()._compute_loss(model, inputs, return_outputs)
