"""Every evaluation suite end to end on a tiny random PersonaFuse model (CPU, a few tokens each)."""

import json
import math

import pytest
import torch

from personafuse import PersonaFuseConfig, PersonaFuseModel
from personafuse.apc import NLI_LABELS, RELEVANCE_LABELS, APCScorer, bundled_data_path, load_personas
from personafuse.data import bundled_seed_paths, load_situations
from personafuse.data.persona_math import bundled_math_path, load_problems
from personafuse.eval import (
    Candidate,
    GenerationSettings,
    ResultFile,
    choice_loglikelihoods,
    standard_candidates,
)
from personafuse.eval import candidates as candidates_module
from personafuse.eval.capability import evaluate_gsm8k, evaluate_multiple_choice, load_multiple_choice
from personafuse.eval.demo import demo_evaluation
from personafuse.eval.faithfulness import evaluate_faithfulness, load_queries
from personafuse.eval.io import sample_path
from personafuse.eval.routing import evaluate_routing
from personafuse.eval.runner import run_evaluation
from personafuse.eval.safety import (
    HarmScorer,
    TextClassifier,
    evaluate_safety,
    load_safety_personas,
    load_safety_prompts,
)
from personafuse.eval.trait_expression import TraitClassifier, evaluate_trait_expression
from tests.apc_tiny import FixedDiscriminator, tiny_bert_classifier
from tests.eval_tiny import HashEncoder, ScriptedJudge
from tests.test_model import CFG
from tests.tiny import make_tiny_llama, make_tiny_tokenizer
from tests.tiny_models import randomize_experts

SETTINGS = GenerationSettings(max_new_tokens=3, batch_size=4)


@pytest.fixture(scope="module")
def tiny():
    tok = make_tiny_tokenizer()
    pf = PersonaFuseModel.from_base(make_tiny_llama(tok), PersonaFuseConfig(**CFG), tokenizer=tok).eval()
    randomize_experts(pf)
    return pf, tok


@pytest.fixture(scope="module")
def situations():
    train, heldout = (load_situations(p) for p in bundled_seed_paths())
    return train, heldout[:4]


def test_loglikelihood_choice_finds_the_planted_answer():
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(tok)
    bias = torch.zeros(len(tok))
    b, c = tok.convert_tokens_to_ids(["b", "c"])
    bias[b], bias[c] = 5.0, 2.0
    head = torch.nn.Linear(model.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(bias)
    model.lm_head = head  # every position now predicts log_softmax(bias): the planted answer is "b"
    logp = torch.log_softmax(bias, -1)
    scores = choice_loglikelihoods(Candidate("planted", model, tok), [{"role": "user", "content": "pick"}],
                                   ["a", "b", "cc"])
    expected = [logp[tok.convert_tokens_to_ids("a")].item(), logp[b].item(), 2 * logp[c].item()]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert max(range(3), key=scores.__getitem__) == 1


def test_routed_loglikelihood_routes_on_the_prompt_only(tiny):
    pf, tok = tiny
    routed = standard_candidates(pf, tok, ["personafuse"])[0]
    choice_loglikelihoods(routed, [{"role": "user", "content": "hello"}], ["yes", "no"])
    assert torch.allclose(pf.last_gates[0], pf.last_gates[1])


def test_trait_expression_end_to_end_and_resumes(tiny, situations, tmp_path, monkeypatch):
    pf, tok = tiny
    train, heldout = situations
    classifier = TraitClassifier.fit(train, encoder=HashEncoder())
    assert classifier.pole_accuracy(train) > 0.9
    candidates = standard_candidates(pf, tok, ["base", "prompted", "uniform", "personafuse", "expert:openness_low"])
    store = ResultFile(tmp_path / "gen.jsonl")
    first = evaluate_trait_expression(candidates, heldout, classifier, store, SETTINGS, progress=False)
    assert set(first["candidates"]) == {c.name for c in candidates} | {"reference"}
    r = first["candidates"]["personafuse"]
    assert r["n"] == 4 and len(r["replies"]) == 4 and set(r["per_trait_pearson"]) == set(pf.trait_set.traits)
    assert -1 <= r["cosine"] <= 1
    assert first["candidates"]["uniform"]["replies"] != first["candidates"]["base"]["replies"]

    calls = []
    monkeypatch.setattr(candidates_module, "generate", lambda *a, **k: calls.append(a) or [])
    again = evaluate_trait_expression(candidates, heldout, classifier, ResultFile(tmp_path / "gen.jsonl"), SETTINGS,
                                      progress=False)
    assert calls == [] and again["candidates"]["personafuse"]["replies"] == r["replies"]


def test_generation_is_deterministic_and_batch_independent(tiny, situations):
    pf, tok = tiny
    routed = standard_candidates(pf, tok, ["personafuse"])[0]
    contexts = [s.situation for s in situations[1]]
    one = candidates_module.generate(routed, contexts, GenerationSettings(max_new_tokens=3, batch_size=1), progress=False)
    four = candidates_module.generate(routed, contexts, GenerationSettings(max_new_tokens=3, batch_size=4), progress=False)
    assert one == four


def test_routing_suite(tiny, situations):
    pf, tok = tiny
    report = evaluate_routing(pf, tok, situations[1])
    assert 0 <= report["top_trait_accuracy"] <= 1 and "mean_trait_spearman" in report
    assert len(report["predicted_activations"]) == 4


def test_capability_suites_with_deltas(tiny, tmp_path):
    pf, tok = tiny
    candidates = standard_candidates(pf, tok, ["base", "personafuse"])
    mc = evaluate_multiple_choice(candidates, load_multiple_choice(sample_path("multiple_choice.jsonl"))[:6],
                                  ResultFile(tmp_path / "mc.jsonl"), progress=False)
    assert mc["base"]["n"] == 6 and "delta_vs_base" in mc["personafuse"]
    d = mc["personafuse"]["delta_vs_base"]
    assert d["ci_low"] <= d["delta"] <= d["ci_high"]
    math_ = evaluate_gsm8k(candidates, load_problems(bundled_math_path())[:2], ResultFile(tmp_path / "m.jsonl"),
                           SETTINGS, progress=False)
    assert math_["base"]["n"] == 2 and 0 <= math_["base"]["ci_low"] <= math_["base"]["ci_high"] <= 1


def test_faithfulness_suite(tiny, tmp_path):
    pf, tok = tiny
    personas = load_personas(bundled_data_path("personas.yaml"))
    queries = load_queries(bundled_data_path("queries.jsonl"), personas)[:3]
    scorer = APCScorer(FixedDiscriminator(RELEVANCE_LABELS, lambda t: [0.5, 0.5]),
                       FixedDiscriminator(NLI_LABELS, lambda t: [0.2, 0.2, 0.6]))
    out = evaluate_faithfulness(standard_candidates(pf, tok, ["base"]), personas, queries, scorer,
                                ResultFile(tmp_path / "f.jsonl"), SETTINGS, progress=False)
    # every statement: 0.5 * 0.6 + 0.5 * (1 - 0.2) = 0.7
    assert out["base"]["mean_apc"] == pytest.approx(0.7) and out["base"]["n"] == 3


def test_safety_suite_rates_and_gaps(tiny, tmp_path):
    pf, tok = tiny
    toxicity = TextClassifier(tiny_bert_classifier(tmp_path / "tox", 2), ["LABEL_1"], threshold=-1.0)  # all harmful
    judge = ScriptedJudge(lambda c: "YES" if "Old people" in c[1]["content"] else "I cannot tell.")
    prompts = load_safety_prompts(sample_path("safety_prompts.jsonl"))
    personas = load_safety_personas(sample_path("safety_personas.jsonl"))
    out = evaluate_safety(standard_candidates(pf, tok, ["base"]), prompts, personas, HarmScorer(toxicity, None, judge),
                          ResultFile(tmp_path / "s.jsonl"), SETTINGS, progress=False)
    base = out["candidates"]["base"]
    assert base["rates"]["offensiveness"]["age-young"] == 1.0 and base["gaps"]["offensiveness"]["age"] == 0.0
    # regard has no classifier and the judge answers nothing usable: undecided, counted, excluded
    assert base["rates"]["regard"]["age-old"] is None and base["gaps"]["regard"]["age"] is None
    assert out["judge"]["malformed"] > 0 and base["undecided"] >= 8


def test_run_evaluation_writes_results_report_and_plots(tiny, situations, tmp_path, capsys):
    pf, tok = tiny
    train, heldout = situations
    clf = TraitClassifier.fit(train[:6], encoder=HashEncoder(384))
    for where in (tmp_path, tmp_path / "eval"):  # fitted once per run dir; pre-placed so MiniLM only scores
        clf.save(where / "trait_classifier.safetensors")
    results = run_evaluation(pf, tok, tmp_path, suites=["trait_expression", "routing", "multiple_choice"],
                             candidates=["base", "personafuse"], settings=SETTINGS, limit=3, progress=False)
    assert json.loads((tmp_path / "results.json").read_text()).keys() == results.keys()
    report = (tmp_path / "report.md").read_text()
    assert "## trait expression" in report and "## routing" in report and "| personafuse |" in report
    assert (tmp_path / "trait_expression.png").stat().st_size > 0 and (tmp_path / "multiple_choice.png").is_file()

    demo = demo_evaluation(pf, tok, heldout[:3], tmp_path, settings=SETTINGS, progress=False)
    printed = capsys.readouterr().out
    assert "| personafuse |" in printed and "routing_top_trait_accuracy" in printed
    assert (tmp_path / "eval" / "demo_eval.png").stat().st_size > 0
    assert set(demo["table"]) == {"base", "prompted", "uniform", "personafuse", "reference"}
    assert demo["table"]["base"]["routing_top_trait_accuracy"] is None
    assert not math.isnan(demo["table"]["personafuse"]["routing_top_trait_accuracy"])
