"""Reading suite inputs (errors name file, line and field) and resumable result files."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from personafuse.data.schema import DataError, load_jsonl
from personafuse.data.synthesize import read_resumable_jsonl

SAMPLES_DIR = Path(__file__).parent / "samples"


def sample_path(name: str) -> Path:
    """A bundled, project-written sample input (``personafuse/eval/samples/<name>``)."""
    return SAMPLES_DIR / name


def read_records(path: str | os.PathLike, required: Mapping[str, type | tuple[type, ...]],
                 optional: Mapping[str, type | tuple[type, ...]] | None = None,
                 check: Callable[[dict], None] | None = None) -> list[dict]:
    """Validated JSON objects of a JSONL file.

    Every line must hold the ``required`` fields with the given types; ``optional`` fields may appear;
    any other key is an error. ``check(record)`` may raise :class:`DataError` for cross-field rules.
    Records without an ``id`` get ``"<file stem>-<line>"``; duplicate ids are an error.
    """
    optional = dict(optional or {})
    allowed = {**required, **optional}

    def parse(record: dict, lineno: int) -> dict:
        _check_fields(record, required, allowed)
        if check is not None:
            check(record)
        record.setdefault("id", f"{Path(path).stem}-{lineno}")
        return record

    records = load_jsonl(path, parse, lambda record: record["id"])
    if not records:
        raise DataError("no records in the file", path=path)
    return records


def _check_fields(record: Any, required: Mapping, allowed: Mapping) -> None:
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    for key in required:
        if key not in record:
            raise DataError(f"missing required field; every line needs {sorted(required)}", field=key)
    for key, value in record.items():
        if key not in allowed:
            raise DataError(f"unknown field; allowed fields are {sorted(allowed)}", field=key)
        if not isinstance(value, allowed[key]) or isinstance(value, bool) and bool not in _types(allowed[key]):
            names = "/".join(t.__name__ for t in _types(allowed[key]))
            raise DataError(f"expected {names}, got {value!r}", field=key)
        if isinstance(value, str) and not value.strip():
            raise DataError("expected a non-empty string", field=key)


def _types(spec: type | tuple[type, ...]) -> tuple[type, ...]:
    return spec if isinstance(spec, tuple) else (spec,)


class ResultFile:
    """An append-only JSONL of finished work items, keyed by a tuple of strings.

    A rerun reads the file back and skips what is done; a line cut off by a killed run is dropped.
    Each row holds ``key`` (a list) and ``value``; rows are flushed as they are written.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._done: dict[tuple[str, ...], Any] = {}
        for lineno, row in read_resumable_jsonl(self.path, "result"):
            if not isinstance(row.get("key"), list) or "value" not in row:
                raise DataError("cannot resume: not a result row with 'key' and 'value'; fix or remove this line",
                                path=self.path, line=lineno)
            self._done[tuple(row["key"])] = row["value"]

    def __contains__(self, key: tuple[str, ...]) -> bool:
        return tuple(key) in self._done

    def __len__(self) -> int:
        return len(self._done)

    def get(self, key: tuple[str, ...], default: Any = None) -> Any:
        return self._done.get(tuple(key), default)

    def put_many(self, items: Iterable[tuple[tuple[str, ...], Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for key, value in items:
                key = tuple(str(k) for k in key)
                self._done[key] = value
                f.write(json.dumps({"key": list(key), "value": value}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
