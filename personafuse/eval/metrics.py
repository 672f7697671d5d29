"""The numbers every suite reports: correlations, accuracies and bootstrap confidence intervals.

Undefined values (a correlation over a constant column, a mean over nothing) are ``None``, never NaN,
so they survive JSON and show as "n/a" in the report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r; ``None`` with fewer than two points or a constant input."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"pearson needs equal lengths, got {x.shape} and {y.shape}")
    if x.size < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / denom) if denom > 1e-12 else None


def ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    result = np.empty(x.size, dtype=np.float64)
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and x[order[j + 1]] == x[order[i]]:
            j += 1
        result[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho: Pearson's r of the (tie-averaged) ranks."""
    return pearson(ranks(x), ranks(y))


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the defined values; ``None`` if there are none."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def top_index_accuracy(predicted: np.ndarray, target: np.ndarray) -> float | None:
    """Share of rows whose largest ``|predicted|`` entry is at the largest ``|target|`` entry."""
    predicted, target = np.asarray(predicted), np.asarray(target)
    if len(target) == 0:
        return None
    return float((np.abs(predicted).argmax(-1) == np.abs(target).argmax(-1)).mean())


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement).

    Deterministic for a given ``seed``. With no values the interval is ``(nan, nan)``.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    index = rng.integers(0, values.size, size=(resamples, values.size))
    stats = values[index].mean(1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


def paired_delta(candidate: Sequence[float], baseline: Sequence[float], confidence: float = 0.95,
                 resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean difference ``candidate - baseline`` over the same items with a paired bootstrap interval."""
    candidate, baseline = np.asarray(candidate, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if candidate.shape != baseline.shape:
        raise ValueError(f"paired_delta needs the same items, got {candidate.shape} and {baseline.shape}")
    diff = candidate - baseline
    low, high = bootstrap_ci(diff, confidence=confidence, resamples=resamples, seed=seed)
    return {"delta": float(diff.mean()) if diff.size else math.nan, "ci_low": low, "ci_high": high,
            "confidence": confidence}
