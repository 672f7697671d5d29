"""Suite 4, capability retention: GSM8K-format generation accuracy and multiple choice by log-likelihood,
each with the delta from a baseline candidate (paired bootstrap interval).

GSM8K format (the public release's own JSONL, read by ``personafuse.data.persona_math.load_problems``)::

    {"question": "...", "answer": "... #### 72"}

Multiple-choice format (MMLU-style; bundled sample ``samples/multiple_choice.jsonl``)::

    {"id": "mc-001", "question": "...", "choices": ["...", "...", "...", "..."], "answer": 2, "subject": "..."}

``answer`` is the 0-based index of the right choice or its letter (``"C"``). :func:`convert_mmlu` writes
this format from the public MMLU files: the original CSVs (question, A, B, C, D, answer letter; no header)
or the Hugging Face ``cais/mmlu`` rows as JSONL (question, subject, choices, answer index).
"""

from __future__ import annotations

import csv
import os
import string
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from personafuse.answers import answers_match, extract_answer
from personafuse.data.persona_math import MathProblem, solve_prompt
from personafuse.data.schema import DataError, read_jsonl, write_jsonl
from personafuse.eval.candidates import Candidate, GenerationSettings, cached_generate, choice_loglikelihoods
from personafuse.eval.io import ResultFile, read_records
from personafuse.eval.metrics import paired_delta
from personafuse.math_eval import wilson_interval

LETTERS = string.ascii_uppercase


def _check_choice(record: dict) -> None:
    choices = record["choices"]
    if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise DataError(f"expected a list of at least 2 non-empty strings, got {choices!r}", field="choices")
    answer = record["answer"]
    index = LETTERS.find(answer.strip().upper()) if isinstance(answer, str) and len(answer.strip()) == 1 else answer
    if not isinstance(index, int) or not 0 <= index < len(choices):
        raise DataError(f"answer {answer!r} is not one of the {len(choices)} choices (0-{len(choices) - 1} or "
                        f"A-{LETTERS[len(choices) - 1]})", field="answer")
    record["answer"] = index


def load_multiple_choice(path: str | os.PathLike) -> list[dict]:
    """Validated multiple-choice items (``answer`` normalised to an index)."""
    return read_records(path, {"question": str, "choices": list, "answer": (int, str)},
                        {"id": str, "subject": str}, check=_check_choice)


def convert_mmlu(source: str | os.PathLike, out: str | os.PathLike, subject: str | None = None) -> Path:
    """Public MMLU (CSV or ``cais/mmlu`` JSONL) -> the multiple-choice JSONL above."""
    source = Path(source)
    subject = subject or source.stem.removesuffix("_test").removesuffix("_dev").removesuffix("_val")
    rows = []
    if source.suffix == ".csv":
        with open(source, newline="", encoding="utf-8") as f:
            for lineno, row in enumerate(csv.reader(f), start=1):
                if len(row) < 4:
                    raise DataError(f"expected question, choices..., answer letter; got {len(row)} columns",
                                    path=source, line=lineno)
                rows.append({"id": f"{subject}-{lineno}", "question": row[0], "choices": row[1:-1],
                             "answer": row[-1].strip(), "subject": subject})
    else:
        for lineno, row in read_jsonl(source):
            try:
                rows.append({"id": f"{row.get('subject') or subject}-{lineno}", "question": row["question"],
                             "choices": list(row["choices"]), "answer": row["answer"],
                             "subject": row.get("subject") or subject})
            except (KeyError, TypeError) as e:
                raise DataError(f"not an MMLU row with question, choices, answer ({e})",
                                path=source, line=lineno) from None
    for lineno, row in enumerate(rows, start=1):
        try:
            _check_choice(row)
        except DataError as e:
            raise e.at(source, lineno) from None
    return write_jsonl(out, rows)


def mc_prompt(item: dict) -> list[dict]:
    listed = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item["choices"]))
    return [{"role": "user", "content": f"{item['question']}\n{listed}\nAnswer with the correct option."}]


def evaluate_multiple_choice(candidates: Sequence[Candidate], items: Sequence[dict], store: ResultFile,
                             baseline: str | None = "base", confidence: float = 0.95, progress: bool = True) -> dict:
    """Accuracy by log-likelihood: the choice whose text is likeliest after the question wins."""
    results = {}
    for c in candidates:
        tag = c.fingerprint()
        correct = []
        for item in tqdm(items, disable=not progress, desc=f"multiple choice: {c.name}", leave=False):
            key = (c.name, tag, item["id"])
            if key not in store:
                scores = choice_loglikelihoods(c, mc_prompt(item), item["choices"])
                store.put_many([(key, {"scores": scores, "answer": item["answer"]})])
            scores = store.get(key)["scores"]
            correct.append(float(max(range(len(scores)), key=scores.__getitem__) == item["answer"]))
        results[c.name] = _accuracy(correct, confidence)
    return _with_deltas(results, baseline, confidence)


def evaluate_gsm8k(candidates: Sequence[Candidate], problems: Sequence[MathProblem], store: ResultFile,
                   settings: GenerationSettings, baseline: str | None = "base", confidence: float = 0.95,
                   progress: bool = True) -> dict:
    """Greedy solutions with the solver prompt; the final answer is extracted and checked."""
    results = {}
    ids = [p.id for p in problems]
    for c in candidates:
        solutions = cached_generate(store, c, ids, [solve_prompt(p.question) for p in problems], settings, progress,
                                    f"gsm8k: {c.name}")
        correct = [float(answers_match(extract_answer(s), p.reference)) for s, p in zip(solutions, problems, strict=True)]
        results[c.name] = _accuracy(correct, confidence)
    return _with_deltas(results, baseline, confidence)


def _accuracy(correct: list[float], confidence: float) -> dict:
    low, high = wilson_interval(int(sum(correct)), len(correct), confidence)
    return {"accuracy": sum(correct) / len(correct) if correct else None, "n": len(correct),
            "ci_low": low, "ci_high": high, "correct": correct}


def _with_deltas(results: dict, baseline: str | None, confidence: float) -> dict:
    if baseline in results:
        for name, r in results.items():
            if name != baseline:
                r["delta_vs_" + baseline] = paired_delta(r["correct"], results[baseline]["correct"], confidence)
    return results
