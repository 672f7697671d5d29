"""The demo claim: on held-out situations, does PersonaFuse express the traits a situation calls for better
than the base model, a persona-prompted base model and a uniform blend of the experts?"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from personafuse.data import Situation
from personafuse.eval.candidates import GenerationSettings, standard_candidates
from personafuse.eval.io import ResultFile
from personafuse.eval.report import bar_chart, markdown_table, write_json, write_report
from personafuse.eval.routing import evaluate_routing
from personafuse.eval.runner import trait_classifier
from personafuse.eval.trait_expression import evaluate_trait_expression

DEMO_SETTINGS = GenerationSettings(max_new_tokens=48, batch_size=12, repetition_penalty=1.2)
COLUMNS = ("mean_pearson", "top_trait_accuracy", "pole_agreement", "cosine", "routing_top_trait_accuracy")


def demo_evaluation(pf, tokenizer, heldout: Sequence[Situation], run_dir: str | os.PathLike,
                    settings: GenerationSettings = DEMO_SETTINGS, progress: bool = True) -> dict:
    """Trait-expression agreement for base / prompted / uniform / PersonaFuse (and the data's reference
    replies as the scorer's ceiling), plus the router's accuracy; prints the table, saves
    ``<run_dir>/eval/demo_eval.png`` and returns the results (also in ``results.json``)."""
    pf.eval()  # dropout in the experts and router would make greedy replies random
    out = Path(run_dir) / "eval"
    classifier = trait_classifier(out, traits=pf.trait_set)
    trait = evaluate_trait_expression(standard_candidates(pf, tokenizer), heldout, classifier,
                                      ResultFile(out / "cache" / "demo_generations.jsonl"), settings, pf.trait_set,
                                      progress=progress)
    routing = evaluate_routing(pf, tokenizer, heldout)
    rows = {}
    for name, r in trait["candidates"].items():
        rows[name] = {c: r[c] for c in COLUMNS[:-1]}
        rows[name]["routing_top_trait_accuracy"] = routing["top_trait_accuracy"] if name == "personafuse" else None
    validity = classifier.pole_accuracy(heldout)
    table = markdown_table(rows, COLUMNS)
    print(f"\n[eval] trait expression on {len(heldout)} held-out situations (MiniLM trait classifier, held-out "
          f"pole accuracy {validity:.2f}; 'reference' = the data's own target replies)\n{table}")
    print(f"[eval] router: top-trait accuracy {routing['top_trait_accuracy']:.2f}, top-pole accuracy "
          f"{routing['top_pole_accuracy']:.2f}, mean per-trait Spearman {_fmt(routing['mean_trait_spearman'])}")
    plot = bar_chart(rows, COLUMNS, out / "demo_eval.png", f"held-out trait expression ({len(heldout)} situations)")
    results = {"trait_expression": trait, "routing": routing, "table": rows, "scorer_pole_accuracy": validity,
               "plot": str(plot)}
    write_json(results, out / "results.json")
    write_report({"trait_expression": trait, "routing": routing}, out / "report.md", "PersonaFuse demo evaluation",
                 notes=[f"Trait scorer held-out pole accuracy: {validity:.2f}.", table])
    print(f"[eval] plot {plot}; details in {out / 'results.json'}")
    return results


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"
