"""Suite 2, routing quality: the router's trait activations against the labels of held-out situations.

Input: situations in the PersonaFuse format (bundled sample: the held-out seed split). Builds on
:func:`personafuse.training.routing_metrics.routing_report` (top-pole and top-trait accuracy, load,
entropy) and adds Spearman rank correlations: per trait across situations, and per situation across traits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from personafuse.data import Situation
from personafuse.eval.metrics import mean, spearman
from personafuse.training.routing_metrics import routing_report


def rank_agreement(predicted, target, traits: Sequence[str]) -> dict:
    """Spearman rho per trait (across situations) and mean per-situation rho (across traits)."""
    predicted, target = np.asarray(predicted, dtype=np.float64), np.asarray(target, dtype=np.float64)
    per_trait = {t: spearman(predicted[:, i], target[:, i]) for i, t in enumerate(traits)}
    return {"per_trait_spearman": per_trait, "mean_trait_spearman": mean(per_trait.values()),
            "situation_spearman": mean([spearman(p, t) for p, t in zip(predicted, target, strict=True)])}


def evaluate_routing(pf, tokenizer, situations: Sequence[Situation]) -> dict:
    report = routing_report(pf, tokenizer, situations)
    return {**report, **rank_agreement(report["predicted_activations"], report["target_activations"],
                                       pf.trait_set.traits)}
