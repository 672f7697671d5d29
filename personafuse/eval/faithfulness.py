"""Suite 3, faithfulness: mean APC of each candidate's replies over persona statement sets.

Inputs: persona statements in either ``personafuse.apc.personas`` format (the APC paper's
``{"character", "statement"}`` JSONL or the YAML), and queries as JSONL::

    {"character": "Mira Okafor", "query": "How long were you at sea?"}

(optional ``id``, ``split``). Bundled sample: the APC data (``personafuse/apc/data/personas.yaml`` and
``queries.jsonl``). Each candidate answers in character (the persona's statements in the system prompt);
:class:`~personafuse.apc.APCScorer` scores each reply; the metric is APC / |S| averaged over queries, with
a bootstrap interval and a per-character breakdown.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from personafuse.apc import APCScorer, Persona, persona_system_prompt
from personafuse.data.schema import DataError
from personafuse.eval.candidates import Candidate, GenerationSettings, cached_generate
from personafuse.eval.io import ResultFile, read_records
from personafuse.eval.metrics import bootstrap_ci


def load_queries(path: str | os.PathLike, personas: Mapping[str, Persona], split: str | None = None) -> list[dict]:
    def known(record):
        if record["character"] not in personas:
            raise DataError(f"unknown character {record['character']!r}; the persona file has {sorted(personas)}",
                            field="character")

    records = read_records(path, {"character": str, "query": str}, {"id": str, "split": str}, check=known)
    return [r for r in records if split is None or r.get("split") == split]


def evaluate_faithfulness(candidates: Sequence[Candidate], personas: Mapping[str, Persona], queries: Sequence[dict],
                          scorer: APCScorer, store: ResultFile, settings: GenerationSettings,
                          confidence: float = 0.95, progress: bool = True) -> dict:
    ids = [q["id"] for q in queries]
    conversations = [[{"role": "system", "content": persona_system_prompt(personas[q["character"]])},
                      {"role": "user", "content": q["query"]}] for q in queries]
    results = {}
    for c in candidates:
        replies = cached_generate(store, c, ids, conversations, settings, progress, f"faithfulness: {c.name}")
        scores = [scorer.score_one(personas[q["character"]], q["query"], r).mean for q, r in zip(queries, replies, strict=True)]
        by_character: dict[str, list[float]] = {}
        for q, s in zip(queries, scores, strict=True):
            by_character.setdefault(q["character"], []).append(s)
        low, high = bootstrap_ci(scores, confidence=confidence)
        results[c.name] = {"mean_apc": sum(scores) / len(scores), "ci_low": low, "ci_high": high, "n": len(scores),
                           "per_character": {k: sum(v) / len(v) for k, v in by_character.items()},
                           "scores": scores, "replies": replies}
    return results
