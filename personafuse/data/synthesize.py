"""Grow the situation dataset with any :class:`~personafuse.data.generators.ChatGenerator`.

For each situation (given, or invented for a domain) the generator writes one reply per trait-pole
expert and, unless the situation already has them, annotates its trait activations. Every finished
situation is validated and appended to the output JSONL at once, so a long run can be stopped and
restarted: ids already in the file are skipped, and a line cut off by the stop is dropped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from personafuse.data.generators import ChatGenerator, Conversation
from personafuse.data.schema import SPLITS, DataError, Situation, validate_activations
from personafuse.traits import BIG_FIVE, TraitSet

log = logging.getLogger(__name__)

# Rotating the speaker's intent keeps invented situations from collapsing onto one kind of request.
ANGLES = (
    "asking for advice on a decision they have to make",
    "venting about something that frustrated them",
    "sharing good news",
    "worried about something coming up soon",
    "in a disagreement with someone and unsure how to handle it",
    "planning something together with other people",
    "stuck on a practical problem",
    "looking for encouragement after a setback",
)


@dataclass
class SynthesisStats:
    """Outcome of one :func:`synthesize` run (counts of input situations)."""

    written: int = 0
    skipped: int = 0
    duplicates: int = 0
    failed: int = 0


class AnnotationError(ValueError):
    """An annotator reply that holds no usable ``{trait: activation}`` object."""


def pole_prompt(traits: TraitSet, expert: str, situation_messages: Sequence[Mapping[str, str]]) -> Conversation:
    """The conversation that asks for ``expert``'s reply: a persona system prompt, then the situation.

    The situation's own system messages are folded into the persona prompt because many chat
    templates accept only one system message, and only at the start.
    """
    trait, pole = traits.split(expert)
    context = [m["content"] for m in situation_messages if m["role"] == "system"]
    system = (
        f"You are a person who is strongly {pole} in {trait}: {', '.join(traits.markers_of(expert))}. "
        "Reply to the last message in 1-3 sentences, in this person's natural voice. Let the personality "
        "show in what you say and how you say it; do not name the trait, describe yourself or mention "
        "these instructions."
    )
    if context:
        system += "\n\nContext of the conversation:\n" + "\n".join(context)
    turns = [{"role": m["role"], "content": m["content"]} for m in situation_messages if m["role"] != "system"]
    return [{"role": "system", "content": system}, *turns]


def annotator_prompt(traits: TraitSet, situation_messages: Sequence[Mapping[str, str]]) -> Conversation:
    """The conversation that asks how strongly the situation calls for each trait, as JSON."""
    transcript = "\n".join(f"{m['role']}: {m['content']}" for m in situation_messages)
    scale = "\n".join(
        f'- "{t}": +1 = {_pole_words(traits, t, "high")}; -1 = {_pole_words(traits, t, "low")}' for t in traits.traits
    )
    keys = ", ".join(f'"{t}"' for t in traits.traits)
    user = (
        f"Conversation:\n{transcript}\n\n"
        "How strongly should the reply to the last user message express each personality trait? "
        f"Score every trait from -1 to 1:\n{scale}\n0 means neither pole is called for.\n"
        f"Answer with only a JSON object with exactly the keys {keys} and numbers as values."
    )
    return [
        {"role": "system", "content": "You annotate conversations for a personality-adaptive assistant."},
        {"role": "user", "content": user},
    ]


def parse_activations(text: str, traits: TraitSet = BIG_FIVE) -> dict[str, float]:
    """Read the annotator's ``{trait: value}`` object out of a reply.

    Models wrap JSON in code fences, prose or an ``{"activations": {...}}`` envelope; the first JSON
    object in the text is used and extra keys are ignored. Missing traits and values outside
    [-1, 1] raise :class:`AnnotationError`.
    """
    found = _first_json_object(text)
    if found is None:
        raise AnnotationError(f"no JSON object in annotator reply {text[:200]!r}")
    if isinstance(found.get("activations"), dict):
        found = found["activations"]
    activations = {t: found[t] for t in traits.traits if t in found}
    try:
        validate_activations(activations, traits)
    except DataError as e:
        raise AnnotationError(f"annotator reply {text[:200]!r}: {e}") from None
    return {t: float(v) for t, v in activations.items()}


def situation_prompt(domain: str, seed: int) -> Conversation:
    """The conversation that invents a new user message about ``domain``; ``seed`` picks the angle."""
    angle = ANGLES[seed % len(ANGLES)]
    user = (
        f"Write one message (1-3 sentences) that someone might send to an AI assistant about {domain}. "
        f"The writer is {angle}. Make it specific and concrete (variation #{seed}). "
        "Reply with the message only, without quotes or preamble."
    )
    return [
        {"role": "system", "content": "You write realistic messages that people send to AI assistants."},
        {"role": "user", "content": user},
    ]


def synthesize(
    source: Mapping[str, int] | Iterable[Situation | Mapping[str, Any]],
    generator: ChatGenerator,
    out_path: str | os.PathLike,
    traits: TraitSet = BIG_FIVE,
    *,
    split: str = "train",
    annotate_retries: int = 2,
    progress: bool = True,
) -> SynthesisStats:
    """Write complete situations to ``out_path``, appending and resuming.

    Args:
        source: ``{domain: count}`` invents ``count`` situations per domain (ids
            ``"<domain>-syn-00000"``, ...); otherwise an iterable of :class:`Situation` or dicts
            with ``id``, ``domain``, ``situation`` and optionally ``split``, ``activations`` or
            ``gates`` and ``response``. Their ``responses`` are always regenerated.
        generator: writes the pole replies, the annotations and invented situations.
        out_path: JSONL file, created or appended to; ids already in it are skipped.
        traits: the experts to write replies for and the traits to annotate.
        split: split of invented situations and of inputs that have none.
        annotate_retries: extra annotation attempts after an unparseable reply.
        progress: show a tqdm bar.

    Situations whose text (normalised) is already in the file or earlier in the run count as
    duplicates and are dropped. A situation whose generation or annotation fails is logged and
    counted as failed; the run goes on.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out_path = Path(out_path)
    done_ids, seen_texts = _resume_state(out_path)
    items, total = _work_items(source, split)
    stats = SynthesisStats()
    with open(out_path, "a", encoding="utf-8") as out, tqdm(items, total=total, disable=not progress,
                                                            desc=f"synthesize {out_path.name}") as bar:
        for item in bar:
            if item["id"] in done_ids:
                stats.skipped += 1
                continue
            try:
                record = _complete(item, generator, traits, annotate_retries, seen_texts)
            except Exception as e:  # one bad item must not cost a long run; the log says which and why
                log.warning("situation %r failed: %s: %s", item["id"], type(e).__name__, e)
                stats.failed += 1
                continue
            if record is None:
                stats.duplicates += 1
                continue
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            done_ids.add(record["id"])
            stats.written += 1
            bar.set_postfix(written=stats.written, failed=stats.failed, refresh=False)
    return stats


def _complete(item: dict[str, Any], generator: ChatGenerator, traits: TraitSet, annotate_retries: int,
              seen_texts: set[str]) -> dict[str, Any] | None:
    """Fill in one situation's replies and activations; ``None`` if its text was already seen."""
    record = dict(item)
    if "_seed" in record:
        text = _clean_message(generator.generate([situation_prompt(record["domain"], record.pop("_seed"))])[0])
        record["situation"] = [{"role": "user", "content": text}]
    key = _normalised_text(record["situation"])
    if key in seen_texts:
        return None
    replies = generator.generate([pole_prompt(traits, e, record["situation"]) for e in traits.expert_names])
    record["responses"] = dict(zip(traits.expert_names, replies, strict=True))
    if "activations" not in record and "gates" not in record:
        record["activations"] = _annotate(generator, traits, record["situation"], annotate_retries)
    situation = Situation.from_dict(record, traits)
    seen_texts.add(key)
    return situation.to_dict()


def _annotate(generator: ChatGenerator, traits: TraitSet, messages: list[dict[str, str]],
              retries: int) -> dict[str, float]:
    conversation = annotator_prompt(traits, messages)
    error = None
    for _ in range(retries + 1):
        try:
            return parse_activations(generator.generate([conversation])[0], traits)
        except AnnotationError as e:
            error = e
    raise AnnotationError(f"no usable annotation after {retries + 1} attempts; last: {error}")


def _work_items(source: Mapping[str, int] | Iterable[Situation | Mapping[str, Any]],
                split: str) -> tuple[Iterable[dict[str, Any]], int | None]:
    """Normalise the source into record stubs (a ``_seed`` key marks a situation still to invent)."""
    if isinstance(source, Mapping):
        stubs = [{"id": f"{domain}-syn-{i:05d}", "domain": domain, "split": split, "_seed": i}
                 for domain, count in source.items() for i in range(count)]
        return stubs, len(stubs)
    total = len(source) if hasattr(source, "__len__") else None
    return (_stub(s, split) for s in source), total


def _stub(situation: Situation | Mapping[str, Any], split: str) -> dict[str, Any]:
    record = situation.to_dict() if isinstance(situation, Situation) else dict(situation)
    missing = [k for k in ("id", "domain", "situation") if k not in record]
    if missing:
        raise DataError(f"input situation needs 'id', 'domain' and 'situation'; got keys {sorted(record)}",
                        field=missing[0])
    record.pop("responses", None)
    record.setdefault("split", split)
    return record


def _resume_state(path: Path) -> tuple[set[str], set[str]]:
    """Ids and normalised texts already in ``path``; a last line without newline (a cut write) is removed."""
    ids: set[str] = set()
    texts: set[str] = set()
    for lineno, record in read_resumable_jsonl(path, "situation"):
        try:
            ids.add(record["id"])
            texts.add(_normalised_text(record["situation"]))
        except (KeyError, TypeError):
            raise DataError("cannot resume: not a situation record; fix or remove this line",
                            path=path, line=lineno) from None
    return ids, texts


def read_resumable_jsonl(path: str | os.PathLike, kind: str = "output") -> list[tuple[int, dict]]:
    """``(line number, record)`` of an append-only JSONL output, to resume from.

    A last line without a newline is what a killed run leaves mid-write: it is removed from the file
    (with a warning) so the next append starts clean. Any other undecodable line is an error.
    """
    path = Path(path)
    records: list[tuple[int, dict]] = []
    if not path.exists():
        return records
    with open(path, "r+b") as f:
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                log.warning("%s: dropping truncated line %d left by an interrupted run", path, lineno)
                f.truncate(offset)
                break
            offset += len(raw)
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                raise DataError(f"cannot resume: not a {kind} record; fix or remove this line",
                                path=path, line=lineno)
            records.append((lineno, record))
    return records


def _first_json_object(text: str) -> dict | None:
    """The first ``{...}`` in ``text`` that decodes as a JSON object (prose and fences around it are skipped)."""
    decoder = json.JSONDecoder()
    for start, char in enumerate(text):
        if char != "{":
            continue
        try:
            found, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(found, dict):
            return found
    return None


def _normalised_text(messages: Sequence[Mapping[str, str]]) -> str:
    """Case- and whitespace-insensitive text of a conversation, the key for exact-duplicate removal."""
    return "\n".join(f"{m['role']}: {' '.join(m['content'].lower().split())}" for m in messages)


def _clean_message(text: str) -> str:
    """Invented messages often come wrapped in quotes; the schema rejects an empty one later."""
    return text.strip().strip('"').strip()


def _pole_words(traits: TraitSet, trait: str, pole: str) -> str:
    markers = traits.markers[trait].get(pole)
    return ", ".join(markers) if markers else f"the {pole} pole of {trait}"
