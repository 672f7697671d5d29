"""Persona diversification of situation data: the same situations, asked by many different people.

Each situation's user turns are rewritten in the voice of ``k`` sampled personas (same facts, request
and emotional tone). The trait activation labels (or gates) are kept: they describe what the
situation calls for, which a change of voice does not change. The pole replies are either kept
(``responses="keep"``: they answer the same content) or written afresh for the new wording by
:func:`~personafuse.data.synthesize.synthesize` (``responses="regenerate"``). The output is the
situation JSONL format, appended and resumable like synthesis; new ids are ``<situation id>~<persona id>``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from personafuse.data.generators import ChatGenerator, Conversation
from personafuse.data.personas import Persona, sample_personas
from personafuse.data.schema import Situation
from personafuse.data.synthesize import SynthesisStats, _normalised_text, _resume_state, synthesize
from personafuse.traits import BIG_FIVE, TraitSet

log = logging.getLogger(__name__)

RESPONSES = ("keep", "regenerate")


def voice_prompt(message: str, persona: Persona, earlier: Sequence[Mapping[str, str]] = ()) -> Conversation:
    """Ask for ``message`` rewritten as ``persona`` would write it (earlier turns given as context)."""
    context = "".join(f"{m['role']}: {m['content']}\n" for m in earlier if m["role"] != "system")
    user = (f"Person: {persona.description}\n\n"
            + (f"Conversation so far:\n{context}\n" if context else "")
            + f"Message:\n{message}\n\n"
            "Rewrite the message as this person would write it to an AI assistant: their own words, vocabulary and "
            "way of speaking. Keep the same facts, request and emotional tone, and about the same length. "
            "Reply with the rewritten message only.")
    return [{"role": "system", "content": "You rewrite chat messages in the voice of a given person."},
            {"role": "user", "content": user}]


def diversify_situations(
    situations: Iterable[Situation],
    personas: Sequence[Persona],
    generator: ChatGenerator,
    out_path: str | os.PathLike,
    traits: TraitSet = BIG_FIVE,
    *,
    k: int = 2,
    seed: int = 0,
    responses: str = "keep",
    sampling: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> SynthesisStats:
    """Write ``k`` persona-voiced variants of every situation to ``out_path`` (counts are of variants).

    Variants whose id is already in the file are skipped; ones whose text (normalised) is already
    there count as duplicates. A variant whose rewrite fails is logged and counted as failed.
    """
    if responses not in RESPONSES:
        raise ValueError(f"responses must be one of {RESPONSES}, got {responses!r}")
    if k > len(personas):
        raise ValueError(f"k={k} personas per situation, but the bank has only {len(personas)}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done_ids, seen_texts = _resume_state(out_path)
    situations = list(situations)
    stats = SynthesisStats()
    variants = []
    with tqdm(situations, disable=not progress, desc=f"persona-voice {out_path.name}") as bar:
        for situation in bar:
            for persona in sample_personas(personas, k, f"{seed}/{situation.id}"):
                vid = f"{situation.id}~{persona.id}"
                if vid in done_ids:
                    stats.skipped += 1
                    continue
                try:
                    variants.append(_variant(situation, persona, vid, generator, dict(sampling or {})))
                except Exception as e:  # one bad variant must not cost a long run
                    log.warning("variant %r failed: %s: %s", vid, type(e).__name__, e)
                    stats.failed += 1
                    continue
                if responses == "keep":
                    _append(out_path, variants.pop(), traits, seen_texts, stats)
    if responses == "regenerate" and variants:
        for record in variants:
            record.pop("response", None)  # a blended reply to the old wording
        produced = synthesize(variants, generator, out_path, traits, progress=progress)
        stats.written += produced.written
        stats.duplicates += produced.duplicates
        stats.failed += produced.failed
    return stats


def _variant(situation: Situation, persona: Persona, vid: str, generator: ChatGenerator,
             sampling: dict[str, Any]) -> dict[str, Any]:
    turns = [i for i, m in enumerate(situation.situation) if m["role"] == "user"]
    prompts = [voice_prompt(situation.situation[i]["content"], persona, situation.situation[:i]) for i in turns]
    rewritten = generator.generate(prompts, **sampling)
    messages = [dict(m) for m in situation.situation]
    for i, text in zip(turns, rewritten, strict=True):
        messages[i]["content"] = text.strip().strip('"').strip()
    return {**situation.to_dict(), "id": vid, "situation": messages}


def _append(out_path: Path, record: dict[str, Any], traits: TraitSet, seen_texts: set[str],
            stats: SynthesisStats) -> None:
    key = _normalised_text(record["situation"])
    if key in seen_texts:
        stats.duplicates += 1
        return
    try:
        situation = Situation.from_dict(record, traits)  # e.g. an empty rewrite
    except ValueError as e:
        log.warning("variant %r failed: %s", record["id"], e)
        stats.failed += 1
        return
    with open(out_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(situation.to_dict(), ensure_ascii=False) + "\n")
    seen_texts.add(key)
    stats.written += 1
