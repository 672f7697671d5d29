"""Accuracy on GSM8K-format problems: greedy solutions, answer extraction, a Wilson confidence interval."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

from tqdm.auto import tqdm

from personafuse.answers import answers_match, extract_answer
from personafuse.data.generators import ChatGenerator
from personafuse.data.persona_math import MathProblem, solve_prompt


@dataclass
class MathEvalResult:
    correct: int
    total: int
    ci_low: float
    ci_high: float
    confidence: float
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total,
                "ci_low": self.ci_low, "ci_high": self.ci_high, "confidence": self.confidence}


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well behaved at 0 and n, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate_math(generator: ChatGenerator, problems: Sequence[MathProblem], batch_size: int = 16,
                  confidence: float = 0.95, max_new_tokens: int = 384, progress: bool = True) -> MathEvalResult:
    """Solve every problem greedily with the solver prompt and score the extracted final answers."""
    rows = []
    with tqdm(total=len(problems), disable=not progress, desc="math eval") as bar:
        for start in range(0, len(problems), batch_size):
            batch = problems[start:start + batch_size]
            solutions = generator.generate([solve_prompt(p.question) for p in batch], temperature=0,
                                           max_new_tokens=max_new_tokens)
            for p, solution in zip(batch, solutions, strict=True):
                predicted = extract_answer(solution)
                rows.append({"id": p.id, "reference": p.reference, "predicted": predicted,
                             "correct": answers_match(predicted, p.reference), "solution": solution})
            bar.update(len(batch))
    correct = sum(r["correct"] for r in rows)
    low, high = wilson_interval(correct, len(rows), confidence)
    return MathEvalResult(correct, len(rows), low, high, confidence, rows)


def save_eval(result: MathEvalResult, out_dir: str | os.PathLike) -> Path:
    """``summary.json`` and one ``predictions.jsonl`` row per problem; returns the directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(result.summary(), indent=2))
    with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rows)
    return out_dir

