"""Results as JSON, a markdown report and bar charts."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path


def fmt(value) -> str:
    if value is None or isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(rows: Mapping[str, Mapping[str, object]], columns: Sequence[str]) -> str:
    lines = ["| model | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    lines += [f"| {name} | " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for name, row in rows.items()]
    return "\n".join(lines)


def bar_chart(rows: Mapping[str, Mapping[str, object]], columns: Sequence[str], path: str | Path, title: str) -> Path:
    """Grouped bars: one group per metric, one bar per model (missing values are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(1.9 * len(columns) + 2, 4))
    for k, name in enumerate(names):
        values = [rows[name].get(c) for c in columns]
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(columns))]
        kept = [(x, v) for x, v in zip(xs, values, strict=True) if isinstance(v, int | float) and not math.isnan(v)]
        if kept:
            ax.bar([x for x, _ in kept], [v for _, v in kept], width, label=name)
    ax.set_xticks(range(len(columns)), [c.replace("_", " ") for c in columns])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(len(names), 3))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_json(results: Mapping, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))
    return path


SUMMARY_COLUMNS = {
    "trait_expression": ("mean_pearson", "top_trait_accuracy", "pole_agreement", "cosine"),
    "faithfulness": ("mean_apc", "ci_low", "ci_high"),
    "adherence": ("persona_score",),
    "personagym": ("persona_score",),
}


def summary_rows(suite: str, result: Mapping) -> dict[str, dict]:
    """``{model: {metric: value}}`` for the headline numbers of one suite's result."""
    if suite in ("trait_expression", "adherence", "personagym"):
        return {n: {c: r.get(c) for c in SUMMARY_COLUMNS[suite]} for n, r in result["candidates"].items()}
    if suite == "faithfulness":
        return {n: {c: r.get(c) for c in SUMMARY_COLUMNS[suite]} for n, r in result.items()}
    if suite == "routing":
        return {"router": {k: result.get(k) for k in ("top_pole_accuracy", "top_trait_accuracy", "mean_trait_spearman",
                                                       "situation_spearman", "mean_entropy")}}
    if suite in ("gsm8k", "multiple_choice"):
        rows = {}
        for n, r in result.items():
            delta = next((v for k, v in r.items() if k.startswith("delta_vs_")), None)
            rows[n] = {"accuracy": r["accuracy"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                       "delta": delta and delta["delta"], "delta_ci": delta and f"[{delta['ci_low']:.3f}, {delta['ci_high']:.3f}]"}
        return rows
    if suite == "safety":
        rows = {}
        for n, r in result["candidates"].items():
            for aspect, gaps in r["gaps"].items():
                rates = [v for v in r["rates"][aspect].values() if v is not None]
                rows[f"{n} / {aspect}"] = {"mean_rate": sum(rates) / len(rates) if rates else None,
                                           **{f"gap_{g}": v for g, v in gaps.items()}}
        return rows
    if suite == "pairwise":
        return {n: {"kind": r["kind"], "accuracy": r["accuracy"], "n": r["n"]} for n, r in result.items()}
    if suite == "personaeval":
        return {n: {k: r[k] for k in ("accuracy", "top2_accuracy", "mean_rank", "accuracy_counting_malformed_as_wrong",
                                      "chance", "trusted", "malformed")} for n, r in result.items()}
    if suite == "personafeedback":
        return {f"{n} / {g}": {"kind": r["kind"], "accuracy": r["accuracy"], "n": r["n"]}
                for g, group in {"all": result["overall"], **result["groups"]}.items() for n, r in group.items()}
    if suite == "judge_sanity":
        return {"judge": {k: result[k] for k in ("accuracy_counting_malformed_as_wrong", "chance", "trusted", "malformed")}}
    raise KeyError(suite)


def write_report(results: Mapping[str, Mapping], path: str | Path, title: str = "PersonaFuse evaluation",
                 notes: Sequence[str] = ()) -> Path:
    """One section per suite with its headline table; the full numbers are in results.json."""
    parts = [f"# {title}", *notes]
    for suite, result in results.items():
        if suite.startswith("_"):
            continue
        rows = summary_rows(suite, result)
        columns = list(dict.fromkeys(c for row in rows.values() for c in row))
        parts += [f"## {suite.replace('_', ' ')}", markdown_table(rows, columns)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(parts) + "\n")
    return path
