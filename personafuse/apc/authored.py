"""The bundled discriminator labels, expanded from project-written dialogue (``data/authored/*.yaml``).

Each authored query lists the persona statements it ``needs`` (the first is its primary statement)
and, unless it needs none, one reply that entails the primary statement and one that contradicts it;
each character also has in-character ``neutral`` replies that touch no statement. Labels follow
from that structure, as the paper's teacher would give them:

* relevance: every needed statement is ``yes``; a seeded sample of the others is ``no``;
* NLI: the entailed and contradicted replies against the primary statement, a neutral reply against
  it, and a borrowed reply (entailed or contradicted, alternating) against a statement the query
  does not need, which it neither supports nor denies: ``neutral``.

    python -m personafuse.apc.authored      # rewrite data/relevance.jsonl and data/nli.jsonl
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from personafuse.apc.labels import validate_row
from personafuse.apc.personas import DATA_DIR, Persona, load_personas
from personafuse.data.schema import DataError, write_jsonl

AUTHORED_DIR = DATA_DIR / "authored"
NEGATIVES_PER_QUERY = 2


@dataclass(frozen=True)
class AuthoredQuery:
    query: str
    needs: tuple[int, ...]
    entailed: str | None = None
    contradicted: str | None = None


@dataclass(frozen=True)
class AuthoredDialogue:
    persona: Persona
    queries: tuple[AuthoredQuery, ...]
    neutral: tuple[str, ...]


def load_authored(path: str | os.PathLike, personas: dict[str, Persona]) -> AuthoredDialogue:
    """Read and validate one character's authored file against that character's statements."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict) or sorted(doc) != ["character", "neutral", "queries"]:
        raise DataError("expected a mapping with exactly 'character', 'queries' and 'neutral'", path=path)
    if doc["character"] not in personas:
        raise DataError(f"unknown character {doc['character']!r}; known: {sorted(personas)}", path=path, field="character")
    persona = personas[doc["character"]]
    neutral = doc["neutral"]
    if not isinstance(neutral, list) or not neutral or not all(isinstance(r, str) and r.strip() for r in neutral):
        raise DataError("expected a non-empty list of replies", path=path, field="neutral")
    queries, seen = [], set()
    for i, record in enumerate(doc["queries"] or []):
        where = f"queries[{i}]"
        if not isinstance(record, dict) or not isinstance(record.get("query"), str) or not record["query"].strip():
            raise DataError("expected a mapping with a non-empty 'query'", path=path, field=where)
        if record["query"] in seen:
            raise DataError(f"duplicate query {record['query']!r}", path=path, field=where)
        seen.add(record["query"])
        needs = record.get("needs")
        if not isinstance(needs, list) or not all(isinstance(n, int) and 0 <= n < len(persona.statements) for n in needs) \
                or len(set(needs)) != len(needs):
            raise DataError(f"expected distinct statement indices in [0, {len(persona.statements)})", path=path,
                            field=f"{where}.needs")
        replies = {k: record.get(k) for k in ("entailed", "contradicted")}
        for key, reply in replies.items():
            if needs and not (isinstance(reply, str) and reply.strip()):
                raise DataError("a query that needs a statement must have both replies", path=path, field=f"{where}.{key}")
            if not needs and reply is not None:
                raise DataError("a query that needs no statement has no entailed/contradicted reply", path=path,
                                field=f"{where}.{key}")
        unknown = sorted(set(record) - {"query", "needs", "entailed", "contradicted"})
        if unknown:
            raise DataError("unknown key", path=path, field=f"{where}.{unknown[0]}")
        queries.append(AuthoredQuery(record["query"], tuple(needs), replies["entailed"], replies["contradicted"]))
    if not queries:
        raise DataError("no queries", path=path, field="queries")
    return AuthoredDialogue(persona, tuple(queries), tuple(neutral))


def relevance_rows(dialogue: AuthoredDialogue, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    persona, rows = dialogue.persona, []
    for q in dialogue.queries:
        others = [i for i in range(len(persona.statements)) if i not in q.needs]
        labelled = [(i, "yes") for i in q.needs] + [(i, "no") for i in rng.sample(others, min(NEGATIVES_PER_QUERY, len(others)))]
        rows.extend({"character": persona.character, "statement": persona.statements[i], "query": q.query, "label": label}
                    for i, label in labelled)
    return rows


def nli_rows(dialogue: AuthoredDialogue, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    persona, rows = dialogue.persona, []

    def row(statement: int, query: str, response: str, label: str) -> dict[str, str]:
        return {"character": persona.character, "statement": persona.statements[statement], "query": query,
                "response": response, "label": label}

    answered = [q for q in dialogue.queries if q.needs]
    for n, q in enumerate(answered):
        primary = q.needs[0]
        others = [i for i in range(len(persona.statements)) if i not in q.needs]
        rows += [row(primary, q.query, q.entailed, "entailed"), row(primary, q.query, q.contradicted, "contradicted"),
                 row(primary, q.query, dialogue.neutral[n % len(dialogue.neutral)], "neutral"),
                 row(rng.choice(others), q.query, q.contradicted if n % 2 else q.entailed, "neutral")]
    for n, q in enumerate(q for q in dialogue.queries if not q.needs):
        rows.append(row(rng.randrange(len(persona.statements)), q.query, dialogue.neutral[-1 - n % len(dialogue.neutral)],
                        "neutral"))
    return rows


def expand_authored(authored_dir: str | os.PathLike = AUTHORED_DIR, personas: dict[str, Persona] | None = None,
                    seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """``{"relevance": rows, "nli": rows}`` over every ``*.yaml`` in ``authored_dir`` (sorted, seeded)."""
    personas = personas or load_personas(DATA_DIR / "personas.yaml")
    files = sorted(Path(authored_dir).glob("*.yaml"))
    if not files:
        raise DataError("no authored *.yaml files", path=authored_dir)
    out = {"relevance": [], "nli": []}
    for k, path in enumerate(files):
        dialogue = load_authored(path, personas)
        out["relevance"] += relevance_rows(dialogue, seed + k)
        out["nli"] += nli_rows(dialogue, seed + k)
    return {kind: [validate_row(r, kind) for r in rows] for kind, rows in out.items()}


def write_bundled(out_dir: str | os.PathLike = DATA_DIR) -> dict[str, tuple[Path, int]]:
    """Rewrite the bundled ``relevance.jsonl`` and ``nli.jsonl`` from the authored dialogue: {kind: (path, rows)}."""
    return {kind: (write_jsonl(Path(out_dir) / f"{kind}.jsonl", rows), len(rows))
            for kind, rows in expand_authored().items()}


if __name__ == "__main__":
    for kind, (path, count) in write_bundled().items():
        print(f"{kind}: {count} rows -> {path}")
