"""The reference evaluation: does the routed mixture express what each held-out situation calls for?

One generation pass over the held-out situations of the training domains serves every question:

* **routing**: the router's top expert is an acceptable pole (held-out and held-out domains), beside the best
  constant guess; how decisive the gates are (largest gate, entropy, mean |activation|);
* **steerability**: each expert at gate 1 against the base model, the shift of its own trait toward its pole
  on the trait scorer's [-1, 1] scale, with a bootstrap 95% CI over situations;
* **end to end**: mean per-situation Pearson between target and expressed trait vectors for PersonaFuse, the
  base model, a uniform blend, the best single fixed expert, an oracle prompt naming the target traits and a
  context-only prompt, with bootstrap CIs and paired deltas against PersonaFuse;
* **capability**: multiple-choice log-likelihood accuracy, PersonaFuse against the base model.

The trait scorer is fitted on pole replies of situations outside the training split, so it never saw a reply
the experts trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from personafuse.data import Situation
from personafuse.data.corpus import acceptable_poles
from personafuse.eval.candidates import (
    PERSONA_PROMPT,
    Candidate,
    GenerationSettings,
    cached_generate,
    standard_candidates,
)
from personafuse.eval.capability import evaluate_multiple_choice, load_multiple_choice
from personafuse.eval.io import ResultFile
from personafuse.eval.metrics import bootstrap_ci, paired_delta, pearson
from personafuse.eval.report import fmt, write_json
from personafuse.eval.router_inputs import best_constant_pole
from personafuse.eval.trait_expression import TraitClassifier
from personafuse.training.router_features import route_situations

LEVEL_WORDS = ((0.75, "strongly"), (0.45, "clearly"), (0.25, "somewhat"))

STEERABILITY_TARGET = {"poles": 9, "mean_shift": 0.25}
ROUTING_TARGETS = {"heldout": 0.80, "heldout_domain": 0.70}


class OraclePromptCandidate(Candidate):
    """The base model told, per situation, which traits the situation calls for (it is handed the labels)."""

    def __init__(self, name: str, model, tokenizer, prompts: dict[str, str]):
        super().__init__(name, model, tokenizer, adapters=False, description="base + oracle trait prompt")
        self.prompts = prompts

    def fingerprint(self, settings=None) -> str:
        prompts = hashlib.sha1(json.dumps(sorted(self.prompts.items())).encode()).hexdigest()[:8]
        return f"{super().fingerprint(settings)}-{prompts}"

    def messages(self, conversation):
        self.system = self.prompts[_conversation_key(conversation)]
        try:
            return super().messages(conversation)
        finally:
            self.system = None


def oracle_prompt(situation: Situation, traits) -> str:
    """A system prompt naming the poles the situation's target activations call for, with their strength."""
    words = {"high": dict(zip(traits.traits, ("curious and imaginative", "organised and thorough", "energetic and outgoing",
                                             "warm and compassionate", "anxious and tense"), strict=False)),
             "low": dict(zip(traits.traits, ("conventional and practical", "casual and spontaneous", "quiet and brief",
                                            "blunt and critical", "calm and steady"), strict=False))}
    parts = []
    for trait, value in sorted(situation.activations.items(), key=lambda kv: -abs(kv[1])):
        level = next((w for threshold, w in LEVEL_WORDS if abs(value) >= threshold), None)
        if level and trait in words["high"]:
            parts.append(f"{level} {words['high' if value > 0 else 'low'][trait]}")
    style = "; ".join(parts) if parts else "neutral"
    return f"In this reply, be {style}. Reply in 1-3 sentences."


def routing_summary(pf, tokenizer, situations: Sequence[Situation], train: Sequence[Situation]) -> dict:
    """Acceptable-pole accuracy per evaluation split, the constant-guess baseline, and gate decisiveness."""
    traits = pf.trait_set
    constant = best_constant_pole(train, traits)
    out = {"constant_pole": constant, "targets": ROUTING_TARGETS}
    for split in ("heldout", "heldout_domain"):
        chosen = [s for s in situations if s.split == split]
        if not chosen:
            continue
        gates = route_situations(pf, tokenizer, chosen)
        hits = [traits.expert_names[int(g.argmax())] in acceptable_poles(s.activations, traits) for g, s in zip(gates, chosen, strict=True)]
        share = gates / gates.sum(-1, keepdim=True).clamp_min(1e-9)
        out[split] = {
            "n": len(chosen), "accuracy": float(np.mean(hits)), "accuracy_ci": list(bootstrap_ci(hits)),
            "constant_accuracy": float(np.mean([constant in acceptable_poles(s.activations, traits) for s in chosen])),
            "largest_gate": float(gates.max(-1).values.mean()),
            "entropy_nats": float(-(share.clamp_min(1e-9).log() * share).sum(-1).mean()),
            "mean_abs_activation": float(traits.gates_to_activations(gates).abs().mean()),
            "ids": [s.id for s in chosen], "gates": gates.tolist(),
            "target_activations": [s.activation_vector(traits).tolist() for s in chosen],
            "predicted_activations": traits.gates_to_activations(gates).tolist(),
        }
    return out


def steerability(scores: dict[str, np.ndarray], traits) -> dict:
    """Per pole: mean shift of its own trait toward the pole, expert at gate 1 vs the base model."""
    out = {}
    for name in traits.expert_names:
        trait, pole = traits.split(name)
        i = traits.traits.index(trait)
        shift = (scores[f"expert:{name}"][:, i] - scores["base"][:, i]) * (1 if pole == "high" else -1)
        low, high = bootstrap_ci(shift)
        out[name] = {"mean_shift": float(shift.mean()), "ci_low": low, "ci_high": high,
                     "meets_target": bool(shift.mean() >= STEERABILITY_TARGET["mean_shift"] and low > 0)}
    out["poles_meeting_target"] = sum(v["meets_target"] for v in out.values() if isinstance(v, dict))
    return out


def per_situation_pearson(expressed: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pearson r across the traits of each situation (0 where either vector is constant)."""
    return np.array([pearson(e, t) or 0.0 for e, t in zip(expressed, target, strict=True)])


def end_to_end(scores: dict[str, np.ndarray], target: np.ndarray, traits, best_expert: str) -> dict:
    """Mean per-situation Pearson with a bootstrap CI per candidate, and paired deltas of PersonaFuse against each."""
    r = {name: per_situation_pearson(s, target) for name, s in scores.items()}
    rows = {}
    for name, label in (("personafuse", "PersonaFuse (routed)"), ("base", "base model"), ("uniform", "uniform blend"),
                        (best_expert, f"best single expert ({best_expert.split(':')[1]})"),
                        ("oracle_prompt", "oracle prompt (names the target traits)"),
                        ("context_prompt", "context-only prompt")):
        low, high = bootstrap_ci(r[name])
        rows[label] = {"mean_pearson": float(r[name].mean()), "ci_low": low, "ci_high": high}
        if name != "personafuse":
            delta = paired_delta(r["personafuse"], r[name])
            rows[label].update({"personafuse_minus_this": delta["delta"], "delta_ci_low": delta["ci_low"],
                                "delta_ci_high": delta["ci_high"]})
    return {"rows": rows, "best_single_expert": best_expert,
            "per_candidate_mean": {n: float(v.mean()) for n, v in r.items()}}


def reference_evaluation(pf, tokenizer, situations: Sequence[Situation], out_dir: str | os.PathLike,
                         settings: GenerationSettings, mc_path: str | os.PathLike | None = None,
                         max_situations: int | None = None, steer_situations: int = 32, progress: bool = True) -> dict:
    """Everything in this module's docstring; writes ``results.json``, ``report.md`` and plots under ``out_dir``."""
    pf.eval()
    out = Path(out_dir)
    traits = pf.trait_set
    train = [s for s in situations if s.split == "train"]
    heldout = spread([s for s in situations if s.split == "heldout"], max_situations)
    scorer_data = [s for s in situations if s.split != "train" and s.responses]
    scorer = TraitClassifier.fit(scorer_data, traits)
    unseen = [s for s in train if s.responses]  # the experts' training replies: the scorer never saw them
    results = {"scorer": {"fitted_on": len(scorer_data), "pole_accuracy_on_expert_training_replies":
                          scorer.pole_accuracy(unseen), **scorer.fit_info,
                          "authored_reply_score_toward_pole": {name: float(v.mean()) for name, v in
                                                               scorer.pole_scores(unseen).items()}}}
    results["routing"] = routing_summary(pf, tokenizer, situations, train)

    store = ResultFile(out / "cache" / "generations.jsonl")
    experts = standard_candidates(pf, tokenizer, [f"expert:{n}" for n in traits.expert_names])
    candidates = standard_candidates(pf, tokenizer, ("base", "uniform", "personafuse"))
    candidates.append(Candidate("context_prompt", pf, tokenizer, system=PERSONA_PROMPT, adapters=False,
                                description="base + 'adapt your personality' prompt"))
    candidates.append(OraclePromptCandidate("oracle_prompt", pf, tokenizer,
                                            {_conversation_key(s.situation): oracle_prompt(s, traits) for s in heldout}))
    target = np.stack([s.activation_vector(traits).numpy() for s in heldout])

    def scored(candidate: Candidate, situations: Sequence[Situation]) -> np.ndarray:
        texts = cached_generate(store, candidate, [s.id for s in situations], [s.situation for s in situations],
                                settings, progress, f"reference: {candidate.name}")
        replies[candidate.name] = texts
        return scorer.score(texts).numpy()

    # Steerability needs every expert but not every situation: an even spread of them.
    replies: dict[str, list[str]] = {}
    probe = spread(heldout, steer_situations)
    probe_rows = [heldout.index(s) for s in probe]
    probe_scores = {c.name: scored(c, probe) for c in experts}
    scores = {c.name: scored(c, heldout) for c in candidates}
    probe_scores["base"] = scores["base"][probe_rows]
    results["steerability"] = steerability(probe_scores, traits)
    results["steerability"]["situations"] = len(probe)
    # The best single fixed expert is chosen on the probe, then answers every situation like the others.
    best = max(experts, key=lambda c: per_situation_pearson(probe_scores[c.name], target[probe_rows]).mean())
    scores[best.name] = scored(best, heldout)
    results["end_to_end"] = end_to_end(scores, target, traits, best.name)
    results["examples"] = [{"id": s.id, "user": s.situation[-1]["content"], "personafuse": replies["personafuse"][i],
                            "base": replies["base"][i]} for i, s in enumerate(heldout[:5])]
    if mc_path is not None:
        mc = load_multiple_choice(mc_path)
        by_name = {c.name: c for c in candidates}
        capability = evaluate_multiple_choice([by_name["base"], by_name["personafuse"]], mc,
                                              ResultFile(out / "cache" / "multiple_choice.jsonl"), progress=progress)
        results["capability"] = {name: {k: v for k, v in r.items() if k != "correct"} for name, r in capability.items()}
    write_json(results, out / "results.json")
    (out / "report.md").write_text(report_markdown(results))
    plot_reference(results, traits, out)
    return results


def report_markdown(results: dict) -> str:
    """The tables RESULTS.md quotes."""
    routing, steer, e2e = results["routing"], results["steerability"], results["end_to_end"]
    lines = ["## Router: top expert is an acceptable pole", "",
             "| split | n | PersonaFuse router | 95% CI | best constant guess | target | largest gate | entropy (nats) | mean abs activation |",
             "|---|---|---|---|---|---|---|---|---|"]
    for split in ("heldout", "heldout_domain"):
        if split in routing:
            r = routing[split]
            lines.append(f"| {split} | {r['n']} | {r['accuracy']:.2f} | [{r['accuracy_ci'][0]:.2f}, {r['accuracy_ci'][1]:.2f}] | "
                         f"{r['constant_accuracy']:.2f} (`{routing['constant_pole']}`) | ≥ {ROUTING_TARGETS[split]:.2f} | "
                         f"{r['largest_gate']:.2f} | {r['entropy_nats']:.2f} | {r['mean_abs_activation']:.2f} |")
    lines += ["", f"## Steerability: each expert at gate 1 vs the base model (target: ≥ {STEERABILITY_TARGET['poles']} of 10 "
              f"poles with mean shift ≥ {STEERABILITY_TARGET['mean_shift']} and CI excluding 0)", "",
              "| pole | mean shift toward the pole | 95% CI | meets target |", "|---|---|---|---|"]
    for name, v in steer.items():
        if isinstance(v, dict):
            lines.append(f"| {name} | {v['mean_shift']:+.3f} | [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}] | {'yes' if v['meets_target'] else 'no'} |")
    lines += ["", f"Poles meeting the target: **{steer['poles_meeting_target']} of 10**.", ""]
    scorer = results["scorer"]
    if "authored_reply_score_toward_pole" in scorer:
        scale = ", ".join(f"{name} {v:+.2f}" for name, v in scorer["authored_reply_score_toward_pole"].items())
        lines += [f"The scale: the scorer (L2 {scorer.get('l2', 0):g}{', cross-validated' if scorer.get('cross_validated') else ''}) "
                  f"puts the authored pole replies of the training situations, which it never saw, at: {scale} "
                  f"(pole accuracy {scorer['pole_accuracy_on_expert_training_replies']:.2f}).", ""]
    lines += ["## End to end: mean per-situation Pearson(target, expressed traits), held-out situations", "",
              "| candidate | mean Pearson | 95% CI | PersonaFuse minus this | 95% CI of the difference |", "|---|---|---|---|---|"]
    for name, v in e2e["rows"].items():
        delta = (f"{v['personafuse_minus_this']:+.3f} | [{v['delta_ci_low']:+.3f}, {v['delta_ci_high']:+.3f}]"
                 if "personafuse_minus_this" in v else "— | —")
        lines.append(f"| {name} | {v['mean_pearson']:.3f} | [{v['ci_low']:.3f}, {v['ci_high']:.3f}] | {delta} |")
    if "capability" in results:
        lines += ["", "## Capability: multiple-choice log-likelihood accuracy", "", "| candidate | accuracy | n | delta vs base |",
                  "|---|---|---|---|"]
        for name, v in results["capability"].items():
            delta = v.get("delta_vs_base", {}).get("delta")
            lines.append(f"| {name} | {fmt(v['accuracy'])} | {v['n']} | {fmt(delta)} |")
    return "\n".join(lines) + "\n"


def plot_reference(results: dict, traits, out: Path) -> None:
    """Routing heatmap, steerability bars with CIs, and the end-to-end comparison with CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steer = {k: v for k, v in results["steerability"].items() if isinstance(v, dict)}
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = list(steer)
    means = [steer[n]["mean_shift"] for n in names]
    errors = [[m - steer[n]["ci_low"] for n, m in zip(names, means, strict=True)],
              [steer[n]["ci_high"] - m for n, m in zip(names, means, strict=True)]]
    ax.bar(range(len(names)), means, yerr=errors, capsize=3, color=["tab:green" if steer[n]["meets_target"] else "tab:grey" for n in names])
    ax.axhline(STEERABILITY_TARGET["mean_shift"], color="tab:red", linestyle="--", linewidth=1, label="target shift")
    ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=7)
    ax.set_ylabel("shift toward the pole")
    ax.set_title("steerability: one expert at gate 1 vs base")
    ax.legend(fontsize=8)
    fig.savefig(out / "steerability.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    rows = results["end_to_end"]["rows"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    labels = list(rows)
    means = [rows[n]["mean_pearson"] for n in labels]
    errors = [[m - rows[n]["ci_low"] for n, m in zip(labels, means, strict=True)],
              [rows[n]["ci_high"] - m for n, m in zip(labels, means, strict=True)]]
    ax.barh(range(len(labels)), means, xerr=errors, capsize=3)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mean per-situation Pearson(target, expressed)")
    ax.set_title("held-out trait expression, 95% bootstrap CIs")
    fig.savefig(out / "comparison.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    routing = results["routing"]
    splits = [s for s in ("heldout", "heldout_domain") if s in routing]
    fig, axes = plt.subplots(1, 2 * len(splits), figsize=(4 * len(splits) + 2, 8), sharey=False)
    for k, split in enumerate(splits):
        for j, key in enumerate(("target_activations", "predicted_activations")):
            ax = axes[2 * k + j]
            image = ax.imshow(routing[split][key], cmap="coolwarm", vmin=-1, vmax=1, aspect="auto")
            ax.set_xticks(range(len(traits.traits)), [t[:5] for t in traits.traits], rotation=45, fontsize=7)
            ax.set_yticks([])
            ax.set_title(f"{split}\n{'target' if j == 0 else 'router'}", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6)
    fig.savefig(out / "routing_heatmap.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def spread(items: list, count: int | None) -> list:
    """``count`` items evenly spaced through ``items`` (all of them for ``None``), so a subset covers every domain."""
    if count is None or count >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / max(count - 1, 1))] for i in range(count)]


def _conversation_key(conversation) -> str:
    return "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in conversation)

