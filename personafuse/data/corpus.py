"""The bundled situation corpus: authored situations and two blind label passes -> adjudicated, split JSONL.

Layout of ``personafuse/data/corpus/`` (see its DATASHEET.md)::

    authored/<domain>.jsonl       situations as written: id, domain, situation, optional pole responses
    labels/pass_a/<domain>.jsonl  labeller A's activations ({"id", "activations"})
    labels/pass_b/<domain>.jsonl  labeller B's activations, made without seeing pass A
    labels/adjudicated.jsonl      the adjudicator's activations where A and B disagree ({"id", "activations", "note"})
    situations.jsonl              the built corpus in the Situation format, one split per line
    agreement.json, AGREEMENT.md  inter-labeller agreement

``python -m personafuse.data.corpus`` rebuilds ``situations.jsonl`` and the agreement report; a test checks
that the committed files equal a fresh build, so the labels and the corpus never drift apart.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from personafuse.data.schema import (
    DataError,
    Situation,
    load_jsonl,
    load_situations,
    validate_activations,
    write_jsonl,
)
from personafuse.eval.metrics import mean, spearman
from personafuse.eval.report import fmt
from personafuse.traits import BIG_FIVE, TraitSet

CORPUS_DIR = Path(__file__).parent / "corpus"
HELDOUT_DOMAINS = ("parenting", "travel_logistics", "cooking_home")
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 13
SIGN_THRESHOLD = 0.25  # |activation| below this counts as "neither pole" for sign agreement
ACCEPTABLE_MAGNITUDE = 0.5  # a pole is an acceptable routing choice when its trait's target reaches this


def corpus_path(name: str = "situations.jsonl") -> Path:
    return CORPUS_DIR / name


def load_authored(directory: Path = CORPUS_DIR) -> list[dict]:
    """Every authored record (without labels), domains in file-name order."""
    records = []
    for path in sorted((directory / "authored").glob("*.jsonl")):
        records += load_jsonl(path, lambda record, _, p=path: _check_authored(record, p.stem), lambda r: r["id"])
    _require_unique([r["id"] for r in records], "authored situations")
    return records


def load_label_pass(directory: Path, traits: TraitSet = BIG_FIVE) -> dict[str, dict[str, float]]:
    """``{id: activations}`` from every JSONL file under ``directory`` (one label pass)."""
    labels: dict[str, dict[str, float]] = {}
    for path in sorted(directory.glob("*.jsonl")):
        for item in load_jsonl(path, lambda record, _: _parse_label(record, traits), lambda r: r[0]):
            if item[0] in labels:
                raise DataError(f"id {item[0]!r} is labelled twice in this pass", path=path, field="id")
            labels[item[0]] = item[1]
    return labels


def needs_adjudication(a: Mapping[str, float], b: Mapping[str, float], traits: TraitSet = BIG_FIVE) -> list[str]:
    """Why two labels of one situation disagree (empty when they agree well enough to average).

    A disagreement is a different top trait, opposite clear signs on a trait (both beyond the sign
    threshold), or a gap of 0.6 or more on any trait.
    """
    reasons = []
    if _top_trait(a, traits) != _top_trait(b, traits):
        reasons.append(f"top trait {_top_trait(a, traits)} vs {_top_trait(b, traits)}")
    for t in traits.traits:
        if min(abs(a[t]), abs(b[t])) >= SIGN_THRESHOLD and np.sign(a[t]) != np.sign(b[t]):
            reasons.append(f"{t} sign {a[t]:+.1f} vs {b[t]:+.1f}")
        elif abs(a[t] - b[t]) >= 0.6:
            reasons.append(f"{t} gap {a[t]:+.1f} vs {b[t]:+.1f}")
    return reasons


def final_activations(pass_a: Mapping[str, Mapping[str, float]], pass_b: Mapping[str, Mapping[str, float]],
                      adjudicated: Mapping[str, Mapping[str, float]], traits: TraitSet = BIG_FIVE) -> dict[str, dict]:
    """The adjudicated label where A and B disagree, otherwise their mean (rounded to 0.05)."""
    missing = sorted(set(pass_a) ^ set(pass_b))
    if missing:
        raise DataError(f"label passes A and B cover different situations, e.g. {missing[:5]}")
    final = {}
    for sid in pass_a:
        if needs_adjudication(pass_a[sid], pass_b[sid], traits):
            if sid not in adjudicated:
                raise DataError(f"situation {sid!r} needs adjudication ({'; '.join(needs_adjudication(pass_a[sid], pass_b[sid], traits))}) "
                                f"but labels/adjudicated.jsonl has no entry for it")
            final[sid] = dict(adjudicated[sid])
        else:
            final[sid] = {t: round(round((pass_a[sid][t] + pass_b[sid][t]) / 2 * 20) / 20, 2) for t in traits.traits}
    return final


def assign_splits(records: Sequence[dict], heldout_domains: Sequence[str] = HELDOUT_DOMAINS,
                  fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED) -> dict[str, str]:
    """``{id: split}``: whole held-out domains, and ``fraction`` of every other domain held out.

    Stratified by domain and by whether a situation carries pole replies, so both splits keep some
    replies (experts train on the train split's, the trait scorer on the held-out ones').
    """
    splits, groups = {}, {}
    for r in records:
        if r["domain"] in heldout_domains:
            splits[r["id"]] = "heldout_domain"
        else:
            groups.setdefault((r["domain"], "responses" in r), []).append(r["id"])
    for key in sorted(groups):
        ids = sorted(groups[key])
        random.Random(f"{seed}:{key[0]}:{key[1]}").shuffle(ids)
        cut = round(len(ids) * fraction)
        splits.update({sid: "heldout" if i < cut else "train" for i, sid in enumerate(ids)})
    return splits


def build(directory: Path = CORPUS_DIR, traits: TraitSet = BIG_FIVE) -> list[Situation]:
    """The corpus as validated situations, from the authored files and the label passes."""
    records = load_authored(directory)
    pass_a = load_label_pass(directory / "labels" / "pass_a", traits)
    pass_b = load_label_pass(directory / "labels" / "pass_b", traits)
    adjudicated = _load_adjudicated(directory / "labels" / "adjudicated.jsonl", traits)
    unlabelled = sorted({r["id"] for r in records} - set(pass_a))
    if unlabelled:
        raise DataError(f"{len(unlabelled)} authored situations have no labels, e.g. {unlabelled[:5]}")
    labels = final_activations(pass_a, pass_b, adjudicated, traits)
    splits = assign_splits(records)
    return [Situation.from_dict({**r, "split": splits[r["id"]], "activations": labels[r["id"]]}, traits)
            for r in records]


def agreement(pass_a: Mapping[str, Mapping[str, float]], pass_b: Mapping[str, Mapping[str, float]],
              traits: TraitSet = BIG_FIVE) -> dict:
    """Per-trait Spearman, top-trait agreement and Cohen's kappa on the sign (-, 0, +) between two passes."""
    ids = sorted(pass_a)
    per_trait = {}
    for t in traits.traits:
        a = [pass_a[i][t] for i in ids]
        b = [pass_b[i][t] for i in ids]
        per_trait[t] = {"spearman": spearman(a, b), "sign_kappa": cohens_kappa([_sign(x) for x in a], [_sign(x) for x in b])}
    top = np.mean([_top_trait(pass_a[i], traits) == _top_trait(pass_b[i], traits) for i in ids])
    flagged = [i for i in ids if needs_adjudication(pass_a[i], pass_b[i], traits)]
    return {"situations": len(ids), "per_trait": per_trait, "top_trait_agreement": float(top),
            "mean_spearman": mean([v["spearman"] for v in per_trait.values()]),
            "mean_sign_kappa": float(np.mean([v["sign_kappa"] for v in per_trait.values()])),
            "adjudicated": len(flagged), "adjudicated_ids": flagged}


def cohens_kappa(a: Sequence, b: Sequence) -> float:
    """Cohen's kappa of two raters' categorical labels (1 = perfect, 0 = chance)."""
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    expected = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / n**2
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def acceptable_poles(activations: Mapping[str, float], traits: TraitSet = BIG_FIVE) -> set[str]:
    """Poles a router may pick first: the trait's target reaches ``ACCEPTABLE_MAGNITUDE`` with that sign."""
    return {f"{t}_{'high' if activations[t] > 0 else 'low'}" for t in traits.traits
            if abs(activations[t]) >= ACCEPTABLE_MAGNITUDE and f"{t}_{'high' if activations[t] > 0 else 'low'}" in traits.expert_names}


def bigrams(text: str) -> set[tuple[str, str]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return set(zip(words, words[1:], strict=False))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def near_duplicates(texts: Sequence[str], embeddings=None, cosine: float = 0.9, bigram_jaccard: float = 0.5) -> list[tuple[int, int, str]]:
    """Pairs ``(i, j, why)`` of texts that look like copies or template fills of each other.

    ``embeddings``: L2-normalised sentence vectors ``[N, D]`` (e.g. MiniLM); without them only the
    word-bigram Jaccard test runs.
    """
    pairs = []
    if embeddings is not None:
        sims = np.asarray(embeddings, dtype=np.float64) @ np.asarray(embeddings, dtype=np.float64).T
        for i, j in zip(*np.nonzero(np.triu(sims, 1) >= cosine), strict=True):
            pairs.append((int(i), int(j), f"cosine {sims[i, j]:.3f}"))
    grams = [bigrams(t) for t in texts]
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            score = jaccard(grams[i], grams[j])
            if score >= bigram_jaccard:
                pairs.append((i, j, f"bigram Jaccard {score:.2f}"))
    return pairs


def situation_text(situation: Situation) -> str:
    """The conversation as one string (what the near-duplicate check compares)."""
    return "\n".join(m["content"] for m in situation.situation)


def statistics(situations: Sequence[Situation], traits: TraitSet = BIG_FIVE) -> dict:
    """Counts a datasheet reports: per split and domain, top poles, reply coverage and lengths."""
    words = [len(situation_text(s).split()) for s in situations]
    top_poles = Counter()
    for s in situations:
        t = _top_trait(s.activations, traits)
        top_poles[f"{t}_{'high' if s.activations[t] > 0 else 'low'}"] += 1
    return {
        "situations": len(situations),
        "domains": dict(sorted(Counter(s.domain for s in situations).items())),
        "splits": dict(Counter(s.split for s in situations)),
        "with_pole_replies": sum(bool(s.responses) for s in situations),
        "multi_turn": sum(len(s.situation) > 1 for s in situations),
        "top_pole": dict(sorted(top_poles.items())),
        "acceptable_pole_counts": dict(sorted(Counter(p for s in situations for p in acceptable_poles(s.activations, traits)).items())),
        "words": {"min": min(words), "median": float(np.median(words)), "max": max(words)},
    }


def write_corpus(directory: Path = CORPUS_DIR, traits: TraitSet = BIG_FIVE) -> dict:
    """Rebuild ``situations.jsonl``, ``agreement.json`` and ``AGREEMENT.md``; returns the agreement."""
    situations = build(directory, traits)
    write_jsonl(directory / "situations.jsonl", (s.to_dict() for s in situations))
    report = agreement(load_label_pass(directory / "labels" / "pass_a", traits),
                       load_label_pass(directory / "labels" / "pass_b", traits), traits)
    report["statistics"] = statistics(situations, traits)
    (directory / "agreement.json").write_text(json.dumps(report, indent=2) + "\n")
    (directory / "AGREEMENT.md").write_text(agreement_markdown(report))
    return report


def agreement_markdown(report: dict) -> str:
    rows = "\n".join(f"| {t} | {fmt(v['spearman'])} | {v['sign_kappa']:.2f} |" for t, v in report["per_trait"].items())
    return (
        "# Inter-labeller agreement (pass A vs pass B, before adjudication)\n\n"
        f"Written by `python -m personafuse.data.corpus` over {report['situations']} situations.\n\n"
        "| trait | Spearman | Cohen's kappa on the sign (−, 0, + at ±0.25) |\n|---|---|---|\n"
        f"{rows}\n| **mean** | {fmt(report['mean_spearman'])} | {report['mean_sign_kappa']:.2f} |\n\n"
        f"Top-trait agreement: {report['top_trait_agreement']:.2f}.\n\n"
        f"Adjudicated (different top trait, opposite clear signs, or a gap ≥ 0.6 on a trait): "
        f"{report['adjudicated']} situations; the adjudicator's labels are in `labels/adjudicated.jsonl`, "
        "the rest are the mean of the two passes.\n"
    )


def bundled_corpus_split(split: str, traits: TraitSet = BIG_FIVE) -> list[Situation]:
    return load_situations(corpus_path(), traits, split=split)


def _check_authored(record: dict, domain: str) -> dict:
    if record.get("domain") != domain:
        raise DataError(f"expected domain {domain!r} (the file name), got {record.get('domain')!r}", field="domain")
    unknown = set(record) - {"id", "domain", "situation", "responses"}
    if unknown:
        raise DataError(f"authored records take id, domain, situation, responses; got {sorted(unknown)}",
                        field=sorted(unknown)[0])
    Situation.from_dict({**record, "split": "train", "activations": {t: 0.0 for t in BIG_FIVE.traits}})
    return record


def _parse_label(record: dict, traits: TraitSet) -> tuple[str, dict[str, float]]:
    if not isinstance(record.get("id"), str):
        raise DataError("expected a string id", field="id")
    return record["id"], validate_activations(record.get("activations"), traits)


def _load_adjudicated(path: Path, traits: TraitSet) -> dict[str, dict[str, float]]:
    if not path.exists():
        return {}
    return dict(load_jsonl(path, lambda record, _: _parse_label(record, traits), lambda r: r[0]))


def _require_unique(ids: Sequence[str], what: str) -> None:
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:
        raise DataError(f"{what}: ids used more than once: {repeated[:5]}")


def _top_trait(activations: Mapping[str, float], traits: TraitSet) -> str:
    return max(traits.traits, key=lambda t: abs(activations[t]))


def _sign(value: float) -> int:
    return 0 if abs(value) < SIGN_THRESHOLD else int(np.sign(value))


if __name__ == "__main__":
    result = write_corpus()
    print(json.dumps({k: v for k, v in result.items() if k != "adjudicated_ids"}, indent=2))
