"""Evaluation harness: trait expression, routing, faithfulness, capability, safety, persona adherence and the
published persona benchmarks (PersonaGym, PersonaEval, PersonaFeedback; ``benchmarks.py``).

One module per suite; :func:`run_evaluation` runs any set of them on a PersonaFuse model and its baselines,
:func:`demo_evaluation` is the short held-out comparison of ``make demo``.
"""

from personafuse.eval.candidates import (
    PERSONA_PROMPT,
    Candidate,
    GenerationSettings,
    cached_generate,
    choice_loglikelihoods,
    generate,
    standard_candidates,
)
from personafuse.eval.demo import demo_evaluation
from personafuse.eval.io import ResultFile, read_records, sample_path
from personafuse.eval.metrics import bootstrap_ci, paired_delta, pearson, spearman
from personafuse.eval.runner import SUITES, run_evaluation

__all__ = [
    "PERSONA_PROMPT",
    "SUITES",
    "Candidate",
    "GenerationSettings",
    "ResultFile",
    "bootstrap_ci",
    "cached_generate",
    "choice_loglikelihoods",
    "demo_evaluation",
    "generate",
    "paired_delta",
    "pearson",
    "read_records",
    "run_evaluation",
    "sample_path",
    "spearman",
    "standard_candidates",
]
