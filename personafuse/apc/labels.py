"""Labelled discriminator data (JSONL), as distillation reads and synthesis writes it.

Relevance, one statement-query pair per line::

    {"character": "...", "statement": "...", "query": "...", "label": "yes"}       # label: no | yes

NLI, one statement-query-response triple per line::

    {"character": "...", "statement": "...", "query": "...", "response": "...", "label": "entailed"}
    # label: contradicted | neutral | entailed
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from personafuse.apc.templates import NLI_LABELS, RELEVANCE_LABELS, nli_text, relevance_text
from personafuse.data.schema import DataError, read_jsonl

KINDS = ("relevance", "nli")


@dataclass(frozen=True)
class LabelSpec:
    kind: str
    fields: tuple[str, ...]
    labels: tuple[str, ...]

    def text(self, row: dict[str, str]) -> str:
        if self.kind == "relevance":
            return relevance_text(row["character"], row["statement"], row["query"])
        return nli_text(row["character"], row["statement"], row["query"], row["response"])


SPECS = {
    "relevance": LabelSpec("relevance", ("character", "statement", "query", "label"), RELEVANCE_LABELS),
    "nli": LabelSpec("nli", ("character", "statement", "query", "response", "label"), NLI_LABELS),
}


def spec(kind: str) -> LabelSpec:
    if kind not in SPECS:
        raise ValueError(f"discriminator kind must be one of {KINDS}, got {kind!r}")
    return SPECS[kind]


def validate_row(record: Any, kind: str) -> dict[str, str]:
    s = spec(kind)
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(s.fields))
    if unknown:
        raise DataError(f"unknown field; allowed fields are {list(s.fields)}", field=unknown[0])
    for name in s.fields:
        value = record.get(name)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"expected a non-empty string, got {value!r}", field=name)
    if record["label"] not in s.labels:
        raise DataError(f"expected one of {list(s.labels)}, got {record['label']!r}", field="label")
    return {name: record[name] for name in s.fields}


def load_labelled(path: str | os.PathLike, kind: str) -> list[dict[str, str]]:
    """Read and validate a labelled JSONL file; blank lines are skipped."""
    rows = []
    for lineno, record in read_jsonl(path):
        try:
            rows.append(validate_row(record, kind))
        except DataError as e:
            raise e.at(path, lineno) from None
    if not rows:
        raise DataError(f"no labelled {kind} rows in the file", path=path)
    return rows
