"""LLM judges: robust parsing of their replies, and tallies of what could not be parsed.

Judges are any :class:`~personafuse.data.generators.ChatGenerator` (a local HF model or an
OpenAI-compatible server, see ``personafuse.data.generators.make_generator``). A reply that holds no
usable score is counted in :class:`ParseTally` and excluded from the averages; it never raises.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from personafuse.data.synthesize import _first_json_object

_NUMBER = r"[-+]?\d+(?:\.\d+)?"


@dataclass
class ParseTally:
    """How many judge replies were parsed and how many were malformed (with a few examples)."""

    parsed: int = 0
    malformed: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, value, reply: str):
        if value is None:
            self.malformed += 1
            if len(self.examples) < 3:
                self.examples.append(reply[:200])
        else:
            self.parsed += 1
        return value

    def to_dict(self) -> dict:
        return {"parsed": self.parsed, "malformed": self.malformed, "malformed_examples": self.examples}


def parse_rating(text: str, low: int = 1, high: int = 5) -> float | None:
    """A score in ``[low, high]`` from a judge reply, or ``None``.

    Tried in order: a JSON object with ``score``/``rating``; "Score: 4", "rating = 4.5", "4/5",
    "**4**"; a lone number in range when it is the only one in the reply.
    """
    found = _first_json_object(text)
    if found is not None:
        for key in ("score", "rating", "Score", "Rating"):
            if isinstance(found.get(key), int | float) and not isinstance(found.get(key), bool):
                return _in_range(float(found[key]), low, high)
    for pattern in (rf"(?:score|rating)\s*(?:is|:|=)?\s*\**\s*({_NUMBER})", rf"({_NUMBER})\s*/\s*{high}\b",
                    rf"\*\*\s*({_NUMBER})\s*\*\*"):
        match = re.search(pattern, text, flags=re.IGNORECASE)
        if match:
            return _in_range(float(match.group(1)), low, high)
    numbers = re.findall(rf"(?<![\w.]){_NUMBER}(?![\w.])", text)
    return _in_range(float(numbers[0]), low, high) if len(numbers) == 1 else None


def _in_range(value: float, low: float, high: float) -> float | None:
    return value if low <= value <= high else None


def parse_choice(text: str, options: Sequence[str]) -> int | None:
    """The index of the option a judge picked (options are short labels such as ``A``/``B`` or role names).

    An explicit "Answer: X" / "Choice: X" / "**X**" wins; otherwise exactly one option must be named as a
    whole word. Ambiguous or empty replies give ``None``.
    """
    escaped = "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))
    lowered = [o.lower() for o in options]
    # Single letters are matched case-sensitively, so the article "a" is not read as option A.
    flags = 0 if all(len(o) == 1 for o in options) else re.IGNORECASE
    for pattern in (rf"(?i:answer|choice|choose|pick|prefer|preferred|winner|role)\s*(?:is|:|=)?\s*\**\s*"
                    rf"(?i:response\s+)?\(?({escaped})\)?(?!\w)",
                    rf"\*\*\s*(?i:response\s+)?({escaped})\s*\*\*"):
        match = re.search(pattern, text, flags=flags)
        if match:
            return lowered.index(match.group(1).lower())
    named = {lowered.index(m.lower()) for m in re.findall(rf"(?<!\w)({escaped})(?!\w)", text, flags=flags)}
    return named.pop() if len(named) == 1 else None


class CachedJudge:
    """A judge whose replies are kept in a :class:`~personafuse.eval.io.ResultFile`: a rerun asks only what it has
    not asked before, so an interrupted run over a large benchmark resumes. A reply is keyed by the judge's name
    and a hash of the conversation and sampling settings; replies are stored every ``chunk`` conversations."""

    def __init__(self, judge, name: str, store, chunk: int = 64):
        self.judge, self.name, self.store, self.chunk = judge, name, store, chunk

    def generate(self, conversations, **sampling) -> list[str]:
        keys = [(self.name, hashlib.sha256(json.dumps([c, sampling], sort_keys=True, ensure_ascii=False)
                                           .encode()).hexdigest()) for c in conversations]
        todo = list(dict.fromkeys(k for k in keys if k not in self.store))
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        for start in range(0, len(todo), self.chunk):
            batch = todo[start:start + self.chunk]
            replies = self.judge.generate([conversations[first[k]] for k in batch], **sampling)
            self.store.put_many(zip(batch, replies, strict=True))
        return [self.store.get(k) for k in keys]
