"""A bank of synthetic personas who ask questions and write messages in their own voice.

A persona has an MBTI-style type (16 types x an assertive/turbulent variant, as in CharacterChat-like
banks), a Big Five profile drawn around what that type implies (scores in [-1, 1], the same scale as
situation activations), an occupation from one of the ten ISCO-08 major groups, and demographic
details. :func:`build_persona_bank` is deterministic in its seed, cycles through the 16 types so they
stay balanced, and removes exact and near-duplicate personas (word-bigram Jaccard of the descriptions).

JSONL format, one persona per line::

    {"id": "p-3f2a...", "mbti": "ENFJ", "variant": "turbulent",
     "big_five": {"openness": 0.41, "conscientiousness": 0.62, "extraversion": 0.55, ...},
     "isco_group": 2, "occupation": "secondary school teacher", "age": 38, "gender": "woman",
     "region": "Nairobi, Kenya", "education": "a master's degree", "interest": "birdwatching",
     "description": "A 38-year-old secondary school teacher from Nairobi, Kenya ..."}
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from personafuse.data.schema import DataError, load_jsonl
from personafuse.traits import BIG_FIVE

ISCO08_MAJOR_GROUPS: dict[int, tuple[str, tuple[str, ...]]] = {
    1: ("Managers", ("hotel manager", "retail store manager", "chief financial officer", "school principal",
                     "construction project manager", "restaurant owner")),
    2: ("Professionals", ("secondary school teacher", "civil engineer", "nurse", "software developer",
                          "pharmacist", "accountant", "lawyer", "architect", "veterinarian")),
    3: ("Technicians and associate professionals", ("laboratory technician", "paramedic", "bookkeeper",
                                                    "real estate agent", "dental hygienist", "IT support technician")),
    4: ("Clerical support workers", ("receptionist", "bank teller", "data entry clerk", "payroll clerk",
                                     "library assistant", "call centre agent")),
    5: ("Service and sales workers", ("chef", "hairdresser", "shop assistant", "childcare worker",
                                      "police officer", "waiter", "tour guide")),
    6: ("Skilled agricultural, forestry and fishery workers", ("dairy farmer", "beekeeper", "fisher",
                                                               "vineyard worker", "forestry worker", "market gardener")),
    7: ("Craft and related trades workers", ("electrician", "carpenter", "plumber", "baker", "tailor",
                                             "car mechanic", "welder")),
    8: ("Plant and machine operators, and assemblers", ("bus driver", "forklift operator", "train driver",
                                                        "factory assembler", "crane operator", "truck driver")),
    9: ("Elementary occupations", ("cleaner", "warehouse packer", "kitchen helper", "delivery courier",
                                   "street vendor", "farm labourer")),
    0: ("Armed forces occupations", ("army sergeant", "naval officer", "air force technician", "military medic")),
}

# The four MBTI letters shift the Big Five means they are known to correlate with; the variant sets neuroticism.
MBTI_TYPES = tuple(a + b + c + d for a in "EI" for b in "NS" for c in "TF" for d in "JP")
VARIANTS = ("assertive", "turbulent")
_LETTER_SHIFT = {"E": ("extraversion", 0.5), "I": ("extraversion", -0.5), "N": ("openness", 0.45),
                 "S": ("openness", -0.3), "F": ("agreeableness", 0.4), "T": ("agreeableness", -0.3),
                 "J": ("conscientiousness", 0.45), "P": ("conscientiousness", -0.4)}
_VARIANT_SHIFT = {"assertive": -0.45, "turbulent": 0.45}
_MBTI_STYLE = {"E": "outgoing", "I": "reserved", "N": "big-picture", "S": "detail-minded", "T": "logical",
               "F": "empathetic", "J": "organised", "P": "spontaneous"}

GENDERS = ("woman", "man", "non-binary person")
REGIONS = ("Nairobi, Kenya", "Lagos, Nigeria", "Cairo, Egypt", "São Paulo, Brazil", "Mexico City, Mexico",
           "Toronto, Canada", "rural Iowa, USA", "Glasgow, Scotland", "Lyon, France", "Kraków, Poland",
           "Istanbul, Turkey", "Mumbai, India", "Dhaka, Bangladesh", "Jakarta, Indonesia", "Manila, the Philippines",
           "Osaka, Japan", "Seoul, South Korea", "Chengdu, China", "Melbourne, Australia", "a village in Norway")
EDUCATION = ("no formal schooling beyond primary school", "a secondary school diploma", "a vocational certificate",
             "a bachelor's degree", "a master's degree", "a doctorate")
INTERESTS = ("birdwatching", "amateur football", "baking bread", "chess", "gardening", "playing the guitar",
             "hiking", "crossword puzzles", "fixing old bicycles", "knitting", "local history", "video games",
             "cooking for friends", "photography", "volunteering at a shelter", "running marathons")
GROUP_BY = ("occupation", "mbti", "variant", "age", "gender", "region")
_FIELDS = ("id", "mbti", "variant", "big_five", "isco_group", "occupation", "age", "gender", "region", "education",
           "interest", "description")


@dataclass(frozen=True)
class Persona:
    """One persona; build with :func:`build_persona_bank` or :meth:`from_dict` (which validates)."""

    id: str
    mbti: str
    variant: str
    big_five: dict[str, float]
    isco_group: int
    occupation: str
    age: int
    gender: str
    region: str
    education: str
    interest: str
    description: str

    def __hash__(self) -> int:
        return hash(self.id)

    def group(self, by: str = "occupation") -> str:
        """The label this persona is counted under in reports: its ISCO-08 major group, MBTI type, ..."""
        if by == "occupation":
            return ISCO08_MAJOR_GROUPS[self.isco_group][0]
        if by == "age":
            return f"{self.age // 10 * 10}s"
        if by in GROUP_BY:
            return str(getattr(self, by))
        raise ValueError(f"group_by must be one of {GROUP_BY}, got {by!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: Any) -> Persona:
        """Validate a decoded JSON record; raises :class:`DataError` naming the offending field."""
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, got {type(record).__name__}")
        missing = [k for k in _FIELDS if k not in record]
        if missing:
            raise DataError(f"missing field; every persona needs {list(_FIELDS)}", field=missing[0])
        unknown = sorted(set(record) - set(_FIELDS))
        if unknown:
            raise DataError(f"unknown field; allowed fields are {list(_FIELDS)}", field=unknown[0])
        for key in ("id", "occupation", "gender", "region", "education", "interest", "description"):
            if not isinstance(record[key], str) or not record[key].strip():
                raise DataError(f"expected a non-empty string, got {record[key]!r}", field=key)
        if record["mbti"] not in MBTI_TYPES:
            raise DataError(f"expected one of the 16 types, got {record['mbti']!r}", field="mbti")
        if record["variant"] not in VARIANTS:
            raise DataError(f"expected one of {list(VARIANTS)}, got {record['variant']!r}", field="variant")
        if record["isco_group"] not in ISCO08_MAJOR_GROUPS or isinstance(record["isco_group"], bool):
            raise DataError(f"expected an ISCO-08 major group 0-9, got {record['isco_group']!r}", field="isco_group")
        if not isinstance(record["age"], int) or isinstance(record["age"], bool) or not 0 < record["age"] < 130:
            raise DataError(f"expected an integer age, got {record['age']!r}", field="age")
        profile = record["big_five"]
        if not isinstance(profile, dict) or set(profile) != set(BIG_FIVE.traits):
            raise DataError(f"expected scores for exactly {list(BIG_FIVE.traits)}, got {profile!r}", field="big_five")
        for trait, value in profile.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1:
                raise DataError(f"expected a number in [-1, 1], got {value!r}", field=f"big_five.{trait}")
        return cls(**record)


def build_persona_bank(n: int, seed: int = 0, near_duplicate_threshold: float = 0.8,
                       max_attempts: int | None = None) -> list[Persona]:
    """``n`` distinct personas, the same for the same seed (a smaller ``n`` gives a prefix of a larger one).

    Candidates that duplicate an earlier persona exactly or nearly (see :func:`deduplicate`) are
    dropped and more are drawn, up to ``max_attempts`` (default ``20 * n``) candidates.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    index = _NearDuplicateIndex(near_duplicate_threshold)
    bank: list[Persona] = []
    for attempt in range(max_attempts if max_attempts is not None else 20 * n):
        if len(bank) == n:
            break
        persona = _draw(rng, MBTI_TYPES[attempt % len(MBTI_TYPES)])
        if index.add(persona.description):
            bank.append(persona)
    if len(bank) < n:
        raise ValueError(f"only {len(bank)} distinct personas after {attempt + 1} candidates (asked for {n}); "
                         "raise near_duplicate_threshold or max_attempts")
    return bank


def deduplicate(personas: Iterable[Persona], threshold: float = 0.8) -> tuple[list[Persona], int, int]:
    """Keep the first of each group of duplicates: ``(kept, exact_duplicates, near_duplicates)``.

    Exact: the same description up to case and whitespace. Near: word-bigram Jaccard similarity of
    the descriptions >= ``threshold`` (1.0 turns near-duplicate removal off).
    """
    index = _NearDuplicateIndex(threshold)
    kept, exact, near = [], 0, 0
    for persona in personas:
        verdict = index.check(persona.description)
        if verdict == "exact":
            exact += 1
        elif verdict == "near":
            near += 1
        else:
            index.add(persona.description)
            kept.append(persona)
    return kept, exact, near


def save_personas(path: str | os.PathLike, personas: Iterable[Persona]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for persona in personas:
            f.write(json.dumps(persona.to_dict(), ensure_ascii=False) + "\n")


def load_personas(path: str | os.PathLike) -> list[Persona]:
    """Read and validate a persona JSONL file; errors name the file, line and field."""
    return load_jsonl(path, lambda record, _: Persona.from_dict(record), lambda p: p.id)


def sample_personas(personas: Sequence[Persona], k: int, key: str) -> list[Persona]:
    """``k`` distinct personas chosen by ``key`` alone (e.g. ``"<seed>/<question id>/<stage>"``), so a
    resumed or reordered run picks the same ones."""
    if k > len(personas):
        raise ValueError(f"asked for {k} personas from a bank of {len(personas)}")
    return random.Random(key).sample(list(personas), k)


def _draw(rng: random.Random, mbti: str) -> Persona:
    variant = rng.choice(VARIANTS)
    profile = {t: 0.0 for t in BIG_FIVE.traits}
    for letter in mbti:
        trait, shift = _LETTER_SHIFT[letter]
        profile[trait] = shift
    profile["neuroticism"] = _VARIANT_SHIFT[variant]
    profile = {t: round(max(-1.0, min(1.0, v + rng.gauss(0, 0.25))), 2) + 0.0 for t, v in profile.items()}  # no -0.0
    isco = rng.choice(sorted(ISCO08_MAJOR_GROUPS))
    occupation = rng.choice(ISCO08_MAJOR_GROUPS[isco][1])
    age = rng.randint(18, 80) if isco != 0 else rng.randint(19, 55)
    gender, region = rng.choice(GENDERS), rng.choice(REGIONS)
    education, interest = rng.choice(EDUCATION), rng.choice(INTERESTS)
    description = (
        f"A {age}-year-old {gender} from {region} who works as a {occupation} and has {education}. "
        f"An {mbti} ({variant}): {', '.join(_MBTI_STYLE[c] for c in mbti)}; {_profile_words(profile)}. "
        f"In their free time they enjoy {interest}."
    )
    pid = "p-" + hashlib.sha1(description.encode()).hexdigest()[:10]
    return Persona(pid, mbti, variant, profile, isco, occupation, age, gender, region, education, interest, description)


def _profile_words(profile: dict[str, float]) -> str:
    """The two most pronounced traits in words, e.g. "very talkative, somewhat anxious"."""
    ranked = sorted(profile.items(), key=lambda kv: -abs(kv[1]))[:2]
    words = []
    for trait, score in ranked:
        degree = "very" if abs(score) >= 0.6 else "somewhat"
        words.append(f"{degree} {BIG_FIVE.markers[trait]['high' if score >= 0 else 'low'][0]}")
    return ", ".join(words)


def _shingles(text: str) -> frozenset[str]:
    words = " ".join(text.lower().split()).split()
    return frozenset(" ".join(pair) for pair in zip(words, words[1:], strict=False)) or frozenset(words)


@functools.cache
def _template_frequencies() -> dict[str, int]:
    """Shingle frequencies over a fixed sample of generated descriptions: boilerplate bigrams sort last."""
    rng = random.Random("personafuse-shingle-order")
    counts: dict[str, int] = {}
    for i in range(256):
        for s in _shingles(_draw(rng, MBTI_TYPES[i % len(MBTI_TYPES)]).description):
            counts[s] = counts.get(s, 0) + 1
    return counts


class _NearDuplicateIndex:
    """Exact + Jaccard near-duplicate detection with prefix filtering: two sets with Jaccard >= t share
    at least one of their first ``|s| - ceil(t |s|) + 1`` elements in any fixed global order, so only
    texts sharing such a prefix element are compared. Rare shingles come first, so postings stay short."""

    def __init__(self, threshold: float):
        if not 0 < threshold <= 1:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.exact: set[str] = set()
        self.sets: list[frozenset[str]] = []
        self.postings: dict[str, list[int]] = {}

    def check(self, text: str) -> str | None:
        if " ".join(text.lower().split()) in self.exact:
            return "exact"
        if self.threshold >= 1:
            return None
        shingles = _shingles(text)
        seen: set[int] = set()
        for token in self._prefix(shingles):
            for i in self.postings.get(token, ()):
                if i in seen:
                    continue
                seen.add(i)
                other = self.sets[i]
                if len(shingles & other) / len(shingles | other) >= self.threshold:
                    return "near"
        return None

    def add(self, text: str) -> bool:
        """Index ``text`` unless it duplicates an indexed one; returns whether it was new."""
        if self.check(text) is not None:
            return False
        self.exact.add(" ".join(text.lower().split()))
        shingles = _shingles(text)
        self.sets.append(shingles)
        for token in self._prefix(shingles):
            self.postings.setdefault(token, []).append(len(self.sets) - 1)
        return True

    def _prefix(self, shingles: frozenset[str]) -> list[str]:
        df = _template_frequencies()
        ordered = sorted(shingles, key=lambda s: (df.get(s, 0), hashlib.md5(s.encode()).digest()))
        return ordered[: len(ordered) - math.ceil(self.threshold * len(ordered)) + 1]
