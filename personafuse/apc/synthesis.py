"""Label synthesis for discriminator distillation, with any teacher :class:`ChatGenerator`.

The paper's pipeline, one teacher call per step (prompts follow the published ones):

1. ``statements_from_profile``: persona statements from a profile text.
2. ``relevant_queries``: user utterances that need each statement (relevance positives).
3. ``relevance_rows``: the positives, plus queries borrowed from other statements, labelled by the teacher.
4. ``nli_responses``: an entailed, a neutral and a contradicted response per (statement, query).
5. ``nli_rows``: every response relabelled by the teacher (its own label is not trusted), plus responses
   borrowed from other statements, relabelled too.

``synthesize_labels`` runs all steps for one character and appends the rows to JSONL files as they
are made; statements already present are skipped, so a stopped run resumes.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Sequence
from pathlib import Path

from personafuse.apc.labels import load_labelled, validate_row
from personafuse.apc.templates import NLI_LABELS, relevance_text
from personafuse.data.generators import ChatGenerator
from personafuse.data.schema import DataError

log = logging.getLogger(__name__)

STATEMENT_SYSTEM = "You are a helpful agent to build AI characters."
QUERY_SYSTEM = "You are helpful agent to build AI characters, your job is to generate possible user utterances to AI characters."
RELEVANCE_SYSTEM = ("You are a helpful agent to build AI characters, your job is to determine whether an utterance from the "
                    "human user to a role-playing AI should be responded by including the information in the given persona "
                    "statement or not.")
NLI_GEN_SYSTEM = ("You are a helpful agent to build AI characters, your job is show possible responses that the given persona "
                  "statement is entailed, neutral, contradicted to them in natural language inference.")
NLI_SYSTEM = ("You are a helpful agent to build AI characters, your job is to discriminate whether the given persona "
              "statement is entailed, neutral, contradict to the response in natural language inference.")
NLI_EXPLANATION = ("Explanation:\nentailed: the response correctly follows the information in the persona statement,\n"
                   "neutral: the response might be correct but lacks the information in the persona statement,\n"
                   "contradict: the response might be partially correct but contains partial hallucination according to "
                   "the persona statement,\n\n---\n\n")


def _ask(generator: ChatGenerator, system: str, prompts: Sequence[str], **sampling) -> list[str]:
    return generator.generate([[{"role": "system", "content": system}, {"role": "user", "content": p}] for p in prompts],
                              **sampling)


def statements_from_profile(generator: ChatGenerator, character: str, profile: str) -> list[str]:
    """Bulleted statements about ``character``, one per paragraph of ``profile``, deduplicated."""
    paragraphs = [p.strip() for p in profile.split("\n\n") if p.strip()]
    prompts = [f'Given the passage about "{character}":\n\n{p}\n\nPlease generate some important persona statements about '
               f'"{character}" for a role-playing AI to follow. Each statement should be formalized as a sentence that '
               f'exactly contains "{character}" and avoids coreference. Write each statement on its own line starting with "- ".'
               for p in paragraphs]
    statements = []
    for reply in _ask(generator, STATEMENT_SYSTEM, prompts, temperature=0):
        statements.extend(m.strip() for m in re.findall(r"^\s*[-*]\s+(.+)$", reply, flags=re.M))
    return list(dict.fromkeys(s for s in statements if s))


def relevant_queries(generator: ChatGenerator, character: str, statements: Sequence[str], n: int = 3) -> dict[str, list[str]]:
    """``{statement: [query, ...]}``: quoted utterances from the teacher (statements with none are dropped)."""
    prompts = [f"Persona Statement: {s}\n\nWhat utterance from the human user to an AI character role-playing as {character} "
               f"has to be responded by including the information in the persona statement above?\n\nProvide {n} diverse "
               f'and concise possible utterances which view the AI as {character}, each in double quotes.' for s in statements]
    out = {}
    for statement, reply in zip(statements, _ask(generator, QUERY_SYSTEM, prompts, temperature=1.0), strict=True):
        queries = list(dict.fromkeys(q.strip() for q in re.findall(r'"([^"\n]+)"', reply) if q.strip()))[:n]
        if queries:
            out[statement] = queries
        else:
            log.warning("no quoted queries in the teacher's reply for %r; statement skipped", statement)
    return out


def parse_label(reply: str, labels: Sequence[str], aliases: dict[str, str] | None = None) -> str | None:
    """The single label a classification reply gives, or None (ambiguous or absent)."""
    words = re.findall(r"[a-z]+", reply.lower())
    found = {aliases.get(w, w) if aliases else w for w in words} & set(labels)
    return found.pop() if len(found) == 1 else None


def relevance_rows(generator: ChatGenerator, character: str, queries: dict[str, list[str]], negatives: int = 5,
                   seed: int = 0) -> list[dict[str, str]]:
    """Positives (a statement's own queries, label yes) and teacher-labelled borrowed queries."""
    rng = random.Random(seed)
    rows, asks = [], []
    statements = list(queries)
    for statement in statements:
        rows.extend({"character": character, "statement": statement, "query": q, "label": "yes"} for q in queries[statement])
        others = [s for s in statements if s != statement]
        for other in rng.sample(others, min(negatives, len(others))):
            asks.append((statement, rng.choice(queries[other])))
    replies = _ask(generator, RELEVANCE_SYSTEM, [relevance_text(character, s, q) for s, q in asks], temperature=0)
    for (statement, query), reply in zip(asks, replies, strict=True):
        label = parse_label(reply, ("no", "yes"))
        if label is not None:
            rows.append({"character": character, "statement": statement, "query": query, "label": label})
    return rows


def nli_responses(generator: ChatGenerator, character: str, pairs: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """For each (statement, query): ``{"entailed": ..., "neutral": ..., "contradicted": ...}`` (unparseable replies give {})."""
    prompts = [f"Character: {character}\n\nPersona Statement: {s}\n\nUser Utterance: {q}\n\n"
               "1. Write a possible response to this utterance that the given persona statement is entailed to it in "
               "natural language inference, indicating the response correctly follows the information in the persona statement.\n\n"
               "2. Write a possible response to this utterance that the given persona statement is neutral to it in natural "
               "language inference, indicating the response might be correct but lacks the information in the persona statement.\n\n"
               "3. Write a possible response to this utterance that the given persona statement is contradicted to it in "
               "natural language inference, indicating the response might be partially correct but contains partial "
               "hallucination according to the persona statement.\n\n"
               '4. Formalize the responses as a JSON object: {"entailed": "...", "neutral": "...", "contradicted": "..."}'
               for s, q in pairs]
    out = []
    for reply in _ask(generator, NLI_GEN_SYSTEM, prompts, temperature=1.0):
        responses = {}
        for candidate in re.findall(r"\{.*?\}", reply.replace("\n", " ")):
            try:
                parsed = json.loads(candidate)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, dict):
                responses = {k.lower(): v.strip() for k, v in parsed.items()
                             if k.lower() in NLI_LABELS and isinstance(v, str) and v.strip()}
                break
        out.append(responses)
    return out


def nli_rows(generator: ChatGenerator, character: str, queries: dict[str, list[str]], borrowed: int = 3,
             seed: int = 0) -> list[dict[str, str]]:
    """Teacher-relabelled NLI triples: each statement's own responses plus responses borrowed from others."""
    rng = random.Random(seed)
    pairs = [(s, q) for s, qs in queries.items() for q in qs]
    generated = [(s, q, r) for (s, q), rs in zip(pairs, nli_responses(generator, character, pairs), strict=True)
                 for r in rs.values()]
    candidates = list(generated)
    for statement in queries:
        others = [g for g in generated if g[0] != statement]
        candidates.extend((statement, q, r) for _, q, r in rng.sample(others, min(borrowed, len(others))))
    prompts = [NLI_EXPLANATION + f"Character: {character}\n    \nPersona Statement: {s}\n\nUser Utterance: {q}\n\n"
               f"Response: {r}\n\nFor this response, is the given persona entailed, neutral, or contradict to it in natural "
               'language inference? Only answer "entailed", "neutral" or "contradicted" without any explanation.'
               for s, q, r in candidates]
    rows = []
    for (s, q, r), reply in zip(candidates, _ask(generator, NLI_SYSTEM, prompts, temperature=0), strict=True):
        label = parse_label(reply, NLI_LABELS, {"contradict": "contradicted", "entail": "entailed", "entails": "entailed"})
        if label is not None:
            rows.append({"character": character, "statement": s, "query": q, "response": r, "label": label})
    return rows


def synthesize_labels(generator: ChatGenerator, character: str, out_dir: str | Path, profile: str | None = None,
                      statements: Sequence[str] | None = None, queries_per_statement: int = 3, negatives: int = 5,
                      borrowed: int = 3, seed: int = 0) -> dict[str, Path]:
    """Steps 1-5 for one character, appended to ``out_dir/{relevance,nli}.jsonl``; returns those paths.

    Give ``statements`` or a ``profile`` to draw them from. Statements whose rows are already in the
    relevance file are skipped (resume).
    """
    if statements is None:
        if not profile:
            raise ValueError("synthesize_labels needs statements or a profile")
        statements = statements_from_profile(generator, character, profile)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"relevance": out_dir / "relevance.jsonl", "nli": out_dir / "nli.jsonl"}
    done = set()
    if paths["relevance"].exists() and paths["relevance"].stat().st_size:
        try:
            done = {(r["character"], r["statement"]) for r in load_labelled(paths["relevance"], "relevance")}
        except DataError as e:
            raise DataError(f"cannot resume: {e.reason}", path=e.path, line=e.line, field=e.field) from None
    todo = [s for s in statements if (character, s) not in done]
    if not todo:
        return paths
    queries = relevant_queries(generator, character, todo, queries_per_statement)
    # NLI first: the relevance file is what marks a statement done
    for kind, rows in (("nli", nli_rows(generator, character, queries, borrowed, seed)),
                       ("relevance", relevance_rows(generator, character, queries, negatives, seed))):
        with open(paths[kind], "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(validate_row(row, kind), ensure_ascii=False) + "\n")
        log.info("%s: %d %s rows -> %s", character, len(rows), kind, paths[kind])
    return paths
