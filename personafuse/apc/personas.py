"""Persona statements: the constraints APC checks a response against.

Two file formats, validated on load (errors name the file, line and field):

JSONL, one statement per line (the paper's release format)::

    {"character": "Mira Okafor", "statement": "Mira Okafor keeps the lighthouse on Gull Island."}

YAML, one mapping per character, or a list of them::

    - character: Mira Okafor
      profile: optional free text the statements were drawn from
      statements:
        - Mira Okafor keeps the lighthouse on Gull Island.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from personafuse.data.schema import DataError, read_jsonl

DATA_DIR = Path(__file__).parent / "data"
JSONL_FIELDS = ("character", "statement")
YAML_FIELDS = ("character", "statements", "profile")


@dataclass(frozen=True)
class Persona:
    """A character and its persona statements (order kept: it is the breakdown order)."""

    character: str
    statements: tuple[str, ...]
    profile: str | None = None


def bundled_data_path(name: str) -> Path:
    """A file of the project-written APC data: ``personas.yaml``, ``relevance.jsonl``, ``nli.jsonl``, ``queries.jsonl``."""
    return DATA_DIR / name


def load_personas(path: str | os.PathLike) -> dict[str, Persona]:
    """``{character: Persona}`` from a ``.jsonl`` or ``.yaml``/``.yml`` file."""
    path = Path(path)
    if path.suffix == ".jsonl":
        personas = _load_jsonl(path)
    elif path.suffix in (".yaml", ".yml"):
        personas = _load_yaml(path)
    else:
        raise DataError("expected a .jsonl, .yaml or .yml persona file", path=path)
    if not personas:
        raise DataError("no persona statements in the file", path=path)
    return personas


def load_persona(path: str | os.PathLike, character: str | None = None) -> Persona:
    """One character's persona; ``character`` may be omitted when the file holds only one."""
    personas = load_personas(path)
    if character is None:
        if len(personas) > 1:
            raise DataError(f"the file holds {sorted(personas)}; name one with character=", path=path)
        return next(iter(personas.values()))
    if character not in personas:
        raise DataError(f"no character {character!r}; the file holds {sorted(personas)}", path=path)
    return personas[character]


def select_personas(path: str | os.PathLike, choice: str | Sequence[str]) -> list[Persona]:
    """The characters a run plays: one name, a list of names, or ``"all"`` (every character, in file order).

    Pooling characters is what gives APC-DPO enough held-out queries for an interval on its effect.
    """
    personas = load_personas(path)
    names = list(personas) if choice == "all" else [choice] if isinstance(choice, str) else list(choice)
    if not names:
        raise DataError("apc.character names no character; give a name, a list of names or 'all'", path=path)
    unknown = [name for name in names if name not in personas]
    if unknown:
        raise DataError(f"no character {unknown[0]!r} (apc.character); the file holds {sorted(personas)}", path=path)
    return [personas[name] for name in names]


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"expected a non-empty string, got {value!r}", field=field)
    return value.strip()


def _load_jsonl(path: Path) -> dict[str, Persona]:
    statements: dict[str, list[str]] = {}
    first_line: dict[tuple[str, str], int] = {}
    for lineno, record in read_jsonl(path):
        try:
            unknown = sorted(set(record) - set(JSONL_FIELDS))
            if unknown:
                raise DataError(f"unknown field; allowed fields are {list(JSONL_FIELDS)}", field=unknown[0])
            character, statement = _text(record.get("character"), "character"), _text(record.get("statement"), "statement")
            if (character, statement) in first_line:
                raise DataError(f"duplicate statement, first given on line {first_line[character, statement]}",
                                field="statement")
        except DataError as e:
            raise e.at(path, lineno) from None
        first_line[character, statement] = lineno
        statements.setdefault(character, []).append(statement)
    return {c: Persona(c, tuple(s)) for c, s in statements.items()}


def _load_yaml(path: Path) -> dict[str, Persona]:
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DataError(f"invalid YAML: {getattr(e, 'problem', e)}", path=path,
                        line=mark.line + 1 if mark else None) from None
    if root is None:
        return {}
    nodes = root.value if isinstance(root, yaml.SequenceNode) else [root]
    personas: dict[str, Persona] = {}
    for node in nodes:
        line = node.start_mark.line + 1
        try:
            record = yaml.safe_load(yaml.serialize(node))
            persona = _yaml_persona(record, node)
        except _Located as e:
            raise e.error.at(path, e.line) from None
        except DataError as e:
            raise e.at(path, line) from None
        if persona.character in personas:
            raise DataError(f"character {persona.character!r} is defined twice", field="character", path=path, line=line)
        personas[persona.character] = persona
    return personas


class _Located(Exception):
    def __init__(self, error: DataError, line: int):
        self.error, self.line = error, line


def _yaml_persona(record: Any, node: yaml.Node) -> Persona:
    if not isinstance(record, dict):
        raise DataError(f"expected a mapping with {list(YAML_FIELDS)}, got {type(record).__name__}")
    unknown = sorted(set(record) - set(YAML_FIELDS))
    if unknown:
        raise DataError(f"unknown field; allowed fields are {list(YAML_FIELDS)}", field=unknown[0])
    character = _text(record.get("character"), "character")
    profile = _text(record["profile"], "profile") if record.get("profile") is not None else None
    raw = record.get("statements")
    if not isinstance(raw, list) or not raw:
        raise DataError(f"expected a non-empty list of statements, got {raw!r}", field="statements")
    item_nodes = next(v.value for k, v in node.value if k.value == "statements")
    statements, seen = [], set()
    for i, (value, item) in enumerate(zip(raw, item_nodes, strict=True)):
        try:
            statement = _text(value, f"statements[{i}]")
            if statement in seen:
                raise DataError("duplicate statement", field=f"statements[{i}]")
        except DataError as e:
            raise _Located(e, item.start_mark.line + 1) from None
        seen.add(statement)
        statements.append(statement)
    return Persona(character, tuple(statements), profile)
