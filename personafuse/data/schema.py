"""The situation dataset format: one JSON object per line (JSONL), validated on load.

Each line is one situation the model may face, the reply each trait-pole expert would give, and
how strongly the situation calls for each trait::

    {"id": "work-0007", "domain": "work", "split": "train",
     "situation": [{"role": "user", "content": "My manager moved my deadline up a week."}],
     "responses": {"openness_high": "...", "openness_low": "...", ...},
     "activations": {"openness": 0.1, "conscientiousness": 0.8, ...},
     "response": "..."}

Fields:
    id: non-empty string, unique within the file.
    domain: non-empty string naming the setting (``"work"``, ``"health"``, ...), used to stratify
        splits and evaluation.
    split: ``"train"``, ``"heldout"`` (held-out situations of the training domains) or ``"heldout_domain"``
        (situations of domains that never appear in training).
    situation: non-empty list of chat messages ``{"role", "content"}``; ``role`` is ``system``,
        ``user`` or ``assistant``, ``content`` a non-empty string, and the last message is ``user``
        (the turn the model answers).
    responses: optional ``{expert_name: reply}`` with a non-empty reply for every expert of the trait set
        (``"<trait>_<pole>"``, e.g. ``"agreeableness_low"``). These train the per-pole LoRA experts and
        the trait scorer; a situation without them still trains and evaluates the router.
        Replies for the other pole of a known trait are allowed, so a both-pole file also serves a
        high-poles-only trait set.
    activations: ``{trait: a}`` with a finite ``a`` in [-1, 1] for every trait: +1 calls for the
        high pole, -1 for the low pole, 0 for neither. The router's gate targets derive from it.
    gates: alternative to ``activations``: ``{expert_name: weight}``, weights >= 0 with a positive
        sum over the trait set's experts (missing experts weigh 0). Give exactly one of the two.
    response: optional non-empty string, a reply expressing the target blend of traits (used to
        train or evaluate the fused model end to end).

Any other key is an error, so a misspelt field name never goes silently unused.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from personafuse.traits import BIG_FIVE, POLES, TraitSet, expert_name

T = TypeVar("T")

SPLITS = ("train", "heldout", "heldout_domain")
ROLES = ("system", "user", "assistant")
REQUIRED_FIELDS = ("id", "domain", "split", "situation")
OPTIONAL_FIELDS = ("responses", "activations", "gates", "response")
SEED_DIR = Path(__file__).parent / "seed"


class DataError(ValueError):
    """A situation record that breaks the format; the message says where and what was expected."""

    def __init__(self, reason: str, *, field: str | None = None, path: str | os.PathLike | None = None,
                 line: int | None = None):
        self.reason, self.field, self.path, self.line = reason, field, path, line
        where = f"{path}:{line}: " if line is not None else f"{path}: " if path is not None else ""
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}{what}{reason}")

    def at(self, path: str | os.PathLike, line: int) -> DataError:
        """The same error, located at ``path:line``."""
        return DataError(self.reason, field=self.field, path=path, line=line)


@dataclass(frozen=True)
class Situation:
    """One validated record of the format above (build with :meth:`from_dict` to validate)."""

    id: str
    domain: str
    split: str
    situation: list[dict[str, str]]
    responses: dict[str, str] = field(default_factory=dict)
    activations: dict[str, float] | None = None
    gates: dict[str, float] | None = None
    response: str | None = None

    @classmethod
    def from_dict(cls, record: Any, traits: TraitSet = BIG_FIVE) -> Situation:
        """Validate a decoded JSON record; raises :class:`DataError` naming the offending field."""
        return _validate(record, traits)

    def to_dict(self) -> dict[str, Any]:
        """The JSON record, without the optional fields that are unset."""
        record = {"id": self.id, "domain": self.domain, "split": self.split, "situation": self.situation}
        for name in OPTIONAL_FIELDS:
            if getattr(self, name):
                record[name] = getattr(self, name)
        return record

    def gate_targets(self, traits: TraitSet = BIG_FIVE, temperature: float = 0.25) -> torch.Tensor:
        """The router's target distribution over ``traits.expert_names``.

        From activations it is the trait set's softmax at ``temperature``; hand-written gates are
        used as given, normalised to sum to one over this trait set's experts.
        """
        if self.activations is not None:
            return traits.activations_to_gate_targets(self.activation_vector(traits), temperature)
        return self._normalised_gates(traits)

    def activation_vector(self, traits: TraitSet = BIG_FIVE) -> torch.Tensor:
        """Per-trait activations in ``traits.traits`` order, derived from the gates if only those are given."""
        if self.activations is not None:
            return torch.tensor([float(self.activations[t]) for t in traits.traits])
        return traits.gates_to_activations(self._normalised_gates(traits))

    def _normalised_gates(self, traits: TraitSet) -> torch.Tensor:
        gates = traits.gates_from_mapping({k: v for k, v in self.gates.items() if k in traits.expert_names})
        total = gates.sum()
        if total <= 0:
            raise DataError(f"gates of situation {self.id!r} sum to 0 over experts {list(traits.expert_names)}",
                            field="gates")
        return gates / total


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSONL file.

    Bad JSON, text that is not UTF-8 or a line that is not an object is a ``DataError`` naming the file
    and line; callers attach the same place to their own validation errors with ``error.at(path, lineno)``.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            text = _decode_line(raw, lineno, path)
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e.msg} at column {e.colno}); expected one JSON object per line",
                                path=path, line=lineno) from None
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object, got {type(record).__name__}", path=path, line=lineno)
            yield lineno, record


def _decode_line(raw: bytes, lineno: int, path: str | os.PathLike) -> str:
    """One line as UTF-8 text (a UTF-8 byte-order mark on line 1 is allowed)."""
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        hint = " (the file looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in raw else ""
        raise DataError(f"not UTF-8 text{hint}: byte {raw[e.start]:#04x} at column {e.start + 1}; save the file as UTF-8",
                        path=path, line=lineno) from None


def load_situations(path: str | os.PathLike, traits: TraitSet = BIG_FIVE,
                    split: str | None = None) -> list[Situation]:
    """Read and validate a situations JSONL file; ``split`` keeps only that split.

    Every line is validated (not only the kept split) so a broken file fails the same way whoever
    reads it. Blank lines are skipped.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    situations = load_jsonl(path, lambda record, _: _validate(record, traits), lambda s: s.id)
    return [s for s in situations if split is None or s.split == split]


def load_jsonl(path: str | os.PathLike, parse: Callable[[dict, int], T], key: Callable[[T], str]) -> list[T]:
    """Every record of a JSONL file through ``parse(record, lineno)``.

    A ``DataError`` from ``parse`` is located at its file and line; two items with the same ``key`` are
    an error naming both lines.
    """
    items, first_line_of = [], {}
    for lineno, record in read_jsonl(path):
        try:
            item = parse(record, lineno)
        except DataError as e:
            raise e.at(path, lineno) from None
        item_key = key(item)
        if item_key in first_line_of:
            raise DataError(f"duplicate id {item_key!r}, first used on line {first_line_of[item_key]}",
                            path=path, line=lineno, field="id")
        first_line_of[item_key] = lineno
        items.append(item)
    return items


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping]) -> Path:
    """Write records as JSONL atomically: readers see the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in records)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def save_situations(path: str | os.PathLike, situations: Iterable[Situation]) -> None:
    """Write situations as JSONL atomically."""
    write_jsonl(path, (situation.to_dict() for situation in situations))


def bundled_seed_paths() -> tuple[Path, Path]:
    """The seed train and held-out files shipped inside the package: ``(situations.jsonl, heldout.jsonl)``."""
    return SEED_DIR / "situations.jsonl", SEED_DIR / "heldout.jsonl"


def expert_sft_rows(situations: Iterable[Situation], expert: str) -> list[dict]:
    """TRL conversational prompt-completion rows that teach one expert its pole's replies.

    Situations without pole replies (router-only data) are skipped.
    """
    rows = []
    for s in situations:
        if not s.responses:
            continue
        if expert not in s.responses:
            raise KeyError(f"situation {s.id!r} has no response for expert {expert!r}; it has {sorted(s.responses)}")
        rows.append(_row(s.situation, s.responses[expert]))
    return rows


def blend_sft_rows(situations: Iterable[Situation]) -> list[dict]:
    """Prompt-completion rows from the blended ``response`` field; situations without one are skipped."""
    return [_row(s.situation, s.response) for s in situations if s.response is not None]


def _row(messages: Sequence[Mapping[str, str]], reply: str) -> dict:
    return {"prompt": [dict(m) for m in messages], "completion": [{"role": "assistant", "content": reply}]}


def _validate(record: Any, traits: TraitSet) -> Situation:
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        raise DataError(f"missing required field; every line needs {list(REQUIRED_FIELDS)}", field=missing[0])
    unknown = sorted(set(record) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise DataError(f"unknown field; allowed fields are {list(REQUIRED_FIELDS + OPTIONAL_FIELDS)}",
                        field=unknown[0])
    for key in ("id", "domain"):
        _require_text(record[key], key)
    if record["split"] not in SPLITS:
        raise DataError(f"expected one of {list(SPLITS)}, got {record['split']!r}", field="split")
    if ("activations" in record) == ("gates" in record):
        raise DataError("give exactly one of 'activations' or 'gates'", field="activations")
    if "response" in record:
        _require_text(record["response"], "response")
    return Situation(
        id=record["id"], domain=record["domain"], split=record["split"],
        situation=_validate_messages(record["situation"]),
        responses=_validate_responses(record["responses"], traits) if "responses" in record else {},
        activations=validate_activations(record["activations"], traits) if "activations" in record else None,
        gates=_validate_gates(record["gates"], traits) if "gates" in record else None,
        response=record.get("response"),
    )


def _require_text(value: Any, field: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"expected a non-empty string, got {value!r}", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        # JSON allows an escaped lone surrogate ("\ud83d"); no tokenizer or Arrow table can store one.
        raise DataError(f"contains an unpaired surrogate {value[e.start]!r} at character {e.start} (a broken "
                        f"\\u escape, e.g. half an emoji); expected valid Unicode text", field=field) from None


def _validate_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"expected a non-empty list of chat messages, got {messages!r}", field="situation")
    for i, m in enumerate(messages):
        field = f"situation[{i}]"
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise DataError(f"expected an object with exactly 'role' and 'content', got {m!r}", field=field)
        if m["role"] not in ROLES:
            raise DataError(f"expected role in {list(ROLES)}, got {m['role']!r}", field=f"{field}.role")
        _require_text(m["content"], f"{field}.content")
    if messages[-1]["role"] != "user":
        raise DataError(f"the last message must be from the user (the turn to answer), got {messages[-1]['role']!r}",
                        field=f"situation[{len(messages) - 1}].role")
    return messages


def _known_experts(traits: TraitSet) -> set[str]:
    return {expert_name(t, p) for t in traits.traits for p in POLES}


def _validate_responses(responses: Any, traits: TraitSet) -> dict[str, str]:
    if not isinstance(responses, dict):
        raise DataError(f"expected an object {{expert_name: reply}}, got {responses!r}", field="responses")
    _reject_unknown(responses, _known_experts(traits), "expert", "responses")
    for name in traits.expert_names:
        if name not in responses:
            raise DataError(f"missing response for pole {name!r}; every expert {list(traits.expert_names)} needs one",
                            field=f"responses.{name}")
        _require_text(responses[name], f"responses.{name}")
    return responses


def validate_activations(activations: Any, traits: TraitSet = BIG_FIVE) -> dict[str, float]:
    """Check ``{trait: value}`` covers every trait with a finite value in [-1, 1]; returns it unchanged."""
    if not isinstance(activations, dict):
        raise DataError(f"expected an object {{trait: value in [-1, 1]}}, got {activations!r}", field="activations")
    _reject_unknown(activations, set(traits.traits), "trait", "activations")
    for trait in traits.traits:
        if trait not in activations:
            raise DataError(f"missing activation for trait {trait!r}; every trait {list(traits.traits)} needs one",
                            field=f"activations.{trait}")
        value = activations[trait]
        if not _is_number(value) or not -1.0 <= value <= 1.0:
            raise DataError(f"expected a finite number in [-1, 1], got {value!r}", field=f"activations.{trait}")
    return activations


def _validate_gates(gates: Any, traits: TraitSet) -> dict[str, float]:
    if not isinstance(gates, dict):
        raise DataError(f"expected an object {{expert_name: weight >= 0}}, got {gates!r}", field="gates")
    _reject_unknown(gates, _known_experts(traits), "expert", "gates")
    for name, value in gates.items():
        if not _is_number(value) or value < 0:
            raise DataError(f"expected a finite number >= 0, got {value!r}", field=f"gates.{name}")
    if sum(v for k, v in gates.items() if k in traits.expert_names) <= 0:
        raise DataError(f"gates must have a positive sum over experts {list(traits.expert_names)}", field="gates")
    return gates


def _reject_unknown(mapping: dict, known: set[str], kind: str, field: str) -> None:
    for key in mapping:
        if key not in known:
            raise DataError(f"unknown {kind} {key!r}; expected one of {sorted(known)}", field=f"{field}.{key}")


def _is_number(value: Any) -> bool:
    # bool is an int subclass; JSON true/false as a weight is a mistake, not 1/0.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
