"""Run any set of suites on a PersonaFuse model and its baselines; write results.json, report.md and plots.

Every suite reads a local file (``data[<key>]``) or, when it is not given, its bundled sample. Generated
replies and per-item scores go to ``<out_dir>/cache/<suite>.jsonl``, so an interrupted run resumes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from personafuse.data import bundled_seed_paths, load_situations, make_generator
from personafuse.eval.candidates import GenerationSettings, standard_candidates
from personafuse.eval.io import ResultFile, sample_path
from personafuse.eval.judges import CachedJudge
from personafuse.eval.report import bar_chart, summary_rows, write_json, write_report

SUITES = ("trait_expression", "routing", "faithfulness", "gsm8k", "multiple_choice", "safety", "adherence",
          "pairwise", "judge_sanity", "personagym", "personaeval", "personafeedback")
BENCHMARK_DATA = {"personagym": "PersonaGym's questions/benchmark-v1 folder", "personaeval": "a PersonaEval CSV or "
                  "a folder of them", "personafeedback": "a PersonaFeedback .jsonl file or a folder of them"}
DEFAULT_CANDIDATES = ("base", "prompted", "uniform", "personafuse")


def trait_classifier(out_dir: str | os.PathLike, train_path: str | os.PathLike | None = None, traits=None):
    """The distilled trait classifier, fitted once per run directory and reloaded after."""
    from personafuse.eval.trait_expression import TraitClassifier
    from personafuse.traits import BIG_FIVE

    path = Path(out_dir) / "trait_classifier.safetensors"
    if path.is_file():
        return TraitClassifier.load(path)
    classifier = TraitClassifier.fit(load_situations(train_path or bundled_seed_paths()[0], traits or BIG_FIVE),
                                     traits or BIG_FIVE)
    classifier.save(path)
    return classifier


def run_evaluation(pf, tokenizer, out_dir: str | os.PathLike, suites: Sequence[str] = ("trait_expression", "routing"),
                   candidates: Sequence[str] = DEFAULT_CANDIDATES, settings: GenerationSettings | None = None,
                   data: Mapping[str, str | None] | None = None, trait_scorer: str = "classifier",
                   judges: Mapping[str, Mapping] | None = None, apc: Mapping[str, str] | None = None,
                   safety: Mapping | None = None, reward_models: Mapping[str, str] | None = None,
                   math_max_new_tokens: int = 256, limit: int | None = None, baseline: str = "base",
                   personafeedback_fields: Mapping[str, str] | None = None, progress: bool = True) -> dict:
    """``judges`` maps a name to a generator spec (``make_generator``); the first judge serves suites that
    need one. ``apc``: ``{"relevance": dir, "nli": dir}``. ``safety``: ``{"toxicity": dir, "harmful_labels": [...],
    "regard": dir}``. ``reward_models``: ``{name: dir}``. The published benchmarks (``personagym``,
    ``personaeval``, ``personafeedback``) have no bundled sample: ``data[<suite>]`` points at the downloaded files
    (optional: ``data["personagym_personas"]``, a persona list; ``data["personagym_rubrics"]``, the rubric
    folder); ``personafeedback_fields`` renames record keys."""
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; suites are {list(SUITES)}")
    data = {k: v for k, v in (data or {}).items() if v}
    for suite in set(suites) & set(BENCHMARK_DATA):
        if suite not in data:
            raise ValueError(f"suite {suite} reads the published files you downloaded: set data.{suite}=<path to "
                             f"{BENCHMARK_DATA[suite]}> (README: Published persona benchmarks)")
    pf.eval()  # dropout in the experts and router would make greedy replies random
    out_dir = Path(out_dir)
    settings = settings or GenerationSettings()
    judge_gens = {name: make_generator(dict(spec)) for name, spec in (judges or {}).items()}
    first_judge = next(iter(judge_gens.values()), None)
    models = standard_candidates(pf, tokenizer, candidates)
    cache = out_dir / "cache"
    cut = slice(limit)
    results, notes = {}, []

    if "trait_expression" in suites or "routing" in suites:
        situations = load_situations(data.get("situations") or bundled_seed_paths()[1], pf.trait_set)[cut]
    if "trait_expression" in suites:
        from personafuse.eval.trait_expression import JudgeTraitScorer, evaluate_trait_expression

        if trait_scorer == "judge":
            if first_judge is None:
                raise ValueError("trait_scorer=judge needs a judge (judges: {name: generator spec})")
            scorer = JudgeTraitScorer(first_judge, pf.trait_set)
        else:
            scorer = trait_classifier(out_dir, data.get("train_situations"), pf.trait_set)
            notes.append(f"Trait scorer: MiniLM classifier, held-out pole accuracy "
                         f"{scorer.pole_accuracy(situations):.2f} (its validity check).")
        results["trait_expression"] = evaluate_trait_expression(models, situations, scorer,
                                                                ResultFile(cache / "trait_expression.jsonl"),
                                                                settings, pf.trait_set, progress=progress)
    if "routing" in suites:
        from personafuse.eval.routing import evaluate_routing

        results["routing"] = evaluate_routing(pf, tokenizer, situations)
    if "faithfulness" in suites:
        from personafuse.apc import APCScorer, bundled_data_path, load_personas
        from personafuse.eval.faithfulness import evaluate_faithfulness, load_queries

        if not apc:
            raise ValueError("faithfulness needs apc={'relevance': dir, 'nli': dir} (personafuse train-discriminator)")
        personas = load_personas(data.get("personas") or bundled_data_path("personas.yaml"))
        queries = load_queries(data.get("queries") or bundled_data_path("queries.jsonl"), personas)[cut]
        results["faithfulness"] = evaluate_faithfulness(models, personas, queries,
                                                        APCScorer.from_pretrained(apc["relevance"], apc["nli"]),
                                                        ResultFile(cache / "faithfulness.jsonl"), settings, progress=progress)
    if "gsm8k" in suites:
        from personafuse.data.persona_math import bundled_math_path, load_problems
        from personafuse.eval.capability import evaluate_gsm8k

        problems = load_problems(data.get("gsm8k") or bundled_math_path())[cut]
        math_settings = GenerationSettings(**{**settings.__dict__, "max_new_tokens": math_max_new_tokens})
        results["gsm8k"] = evaluate_gsm8k(models, problems, ResultFile(cache / "gsm8k.jsonl"), math_settings,
                                          baseline, progress=progress)
    if "multiple_choice" in suites:
        from personafuse.eval.capability import evaluate_multiple_choice, load_multiple_choice

        items = load_multiple_choice(data.get("multiple_choice") or sample_path("multiple_choice.jsonl"))[cut]
        results["multiple_choice"] = evaluate_multiple_choice(models, items, ResultFile(cache / "multiple_choice.jsonl"),
                                                              baseline, progress=progress)
    if "safety" in suites:
        from personafuse.eval.safety import (
            HarmScorer,
            TextClassifier,
            evaluate_safety,
            load_safety_personas,
            load_safety_prompts,
        )

        safety = dict(safety or {})
        harmful = safety.get("harmful_labels") or ["toxic"]
        scorer = HarmScorer(TextClassifier(safety["toxicity"], harmful) if safety.get("toxicity") else None,
                            TextClassifier(safety["regard"], ["negative"]) if safety.get("regard") else None,
                            first_judge)
        prompts = load_safety_prompts(data.get("safety_prompts") or sample_path("safety_prompts.jsonl"))[cut]
        personas = load_safety_personas(data.get("safety_personas") or sample_path("safety_personas.jsonl"))
        results["safety"] = evaluate_safety(models, prompts, personas, scorer, ResultFile(cache / "safety.jsonl"),
                                            settings, progress=progress)
    if "adherence" in suites:
        from personafuse.eval.adherence import evaluate_persona_adherence, load_adherence

        items = load_adherence(data.get("adherence") or sample_path("persona_adherence.jsonl"))[cut]
        results["adherence"] = evaluate_persona_adherence(models, items, judge_gens,
                                                          ResultFile(cache / "adherence.jsonl"), settings, progress)
    if "pairwise" in suites:
        from personafuse.eval.adherence import RewardModel, evaluate_pairwise, load_pairwise

        items = load_pairwise(data.get("pairwise") or sample_path("pairwise.jsonl"))[cut]
        results["pairwise"] = evaluate_pairwise(items, judge_gens,
                                                {n: RewardModel(p) for n, p in (reward_models or {}).items()})
    if "judge_sanity" in suites:
        from personafuse.eval.adherence import judge_sanity_check, load_role_identification

        if first_judge is None:
            raise ValueError("judge_sanity needs a judge (judges: {name: generator spec})")
        items = load_role_identification(data.get("role_identification") or sample_path("role_identification.jsonl"))[cut]
        results["judge_sanity"] = judge_sanity_check(first_judge, items)

    def cached_judges(suite: str) -> dict:  # the published benchmarks are large: judge replies resume too
        store = ResultFile(cache / f"{suite}.judges.jsonl")
        return {name: CachedJudge(judge, name, store) for name, judge in judge_gens.items()}

    if "personagym" in suites:
        from personafuse.eval.benchmarks import evaluate_personagym, load_personagym, load_personagym_rubrics

        items = load_personagym(data["personagym"], data.get("personagym_personas"))[cut]
        rubrics = load_personagym_rubrics(data["personagym_rubrics"]) if data.get("personagym_rubrics") else None
        results["personagym"] = evaluate_personagym(models, items, cached_judges("personagym"),
                                                    ResultFile(cache / "personagym.jsonl"), settings, progress, rubrics)
    if "personaeval" in suites:
        from personafuse.eval.benchmarks import evaluate_personaeval, load_personaeval

        results["personaeval"] = evaluate_personaeval(cached_judges("personaeval"),
                                                      load_personaeval(data["personaeval"])[cut])
    if "personafeedback" in suites:
        from personafuse.eval.adherence import RewardModel
        from personafuse.eval.benchmarks import evaluate_personafeedback, load_personafeedback

        items = load_personafeedback(data["personafeedback"], personafeedback_fields)[cut]
        results["personafeedback"] = evaluate_personafeedback(
            items, cached_judges("personafeedback"), {n: RewardModel(p) for n, p in (reward_models or {}).items()})

    write_json(results, out_dir / "results.json")
    write_report(results, out_dir / "report.md", notes=notes)
    for suite in ("trait_expression", "gsm8k", "multiple_choice", "adherence", "personagym"):
        if suite in results:
            rows = summary_rows(suite, results[suite])
            columns = [c for c in next(iter(rows.values())) if c not in ("ci_low", "ci_high", "delta_ci", "delta")]
            bar_chart(rows, columns, out_dir / f"{suite}.png", suite.replace("_", " "))
    return results
