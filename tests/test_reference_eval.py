"""The reference evaluation: its metrics on known inputs, and one end-to-end run on a tiny stack."""

import json

import numpy as np
import pytest

from personafuse import PersonaFuseConfig, PersonaFuseModel
from personafuse.data import Situation, bundled_seed_paths, load_situations
from personafuse.eval.candidates import GenerationSettings
from personafuse.eval.reference import end_to_end, oracle_prompt, reference_evaluation, spread, steerability
from personafuse.traits import BIG_FIVE
from tests.tiny import make_tiny_llama, make_tiny_tokenizer

TRAITS = BIG_FIVE.traits


def test_oracle_prompt_names_the_called_for_poles_by_strength():
    s = Situation.from_dict({"id": "x", "domain": "d", "split": "heldout", "situation": [{"role": "user", "content": "hi"}],
                             "activations": {"openness": 0.1, "conscientiousness": 0.3, "extraversion": -0.5,
                                             "agreeableness": 0.9, "neuroticism": -0.8}})
    assert oracle_prompt(s, BIG_FIVE) == ("In this reply, be strongly warm and compassionate; strongly calm and steady; "
                                          "clearly quiet and brief; somewhat organised and thorough. Reply in 1-3 sentences.")


def test_steerability_signs_the_shift_toward_each_pole():
    rng = np.random.default_rng(0)
    base = rng.uniform(-0.2, 0.2, size=(30, 5))
    scores = {"base": base}
    for name in BIG_FIVE.expert_names:
        trait, pole = BIG_FIVE.split(name)
        shifted = base.copy()
        strength = 0.0 if name in ("openness_low", "neuroticism_high") else 0.4
        shifted[:, TRAITS.index(trait)] += strength if pole == "high" else -strength
        scores[f"expert:{name}"] = shifted
    result = steerability(scores, BIG_FIVE)
    assert result["poles_meeting_target"] == 8
    assert result["agreeableness_low"]["mean_shift"] == pytest.approx(0.4)
    assert not result["openness_low"]["meets_target"] and result["openness_low"]["mean_shift"] == pytest.approx(0.0)


def test_end_to_end_pairs_personafuse_against_each_baseline():
    rng = np.random.default_rng(1)
    target = rng.uniform(-1, 1, size=(40, 5))
    noise = rng.normal(0, 1, size=(40, 5))
    scores = {"personafuse": target + 0.1 * noise, "base": noise, "uniform": -target, "expert:openness_high": noise[::-1],
              "oracle_prompt": target + 0.5 * noise, "context_prompt": noise * 2}
    result = end_to_end(scores, target, BIG_FIVE, "expert:openness_high")
    rows = result["rows"]
    assert rows["PersonaFuse (routed)"]["mean_pearson"] > 0.9
    assert rows["uniform blend"]["mean_pearson"] == pytest.approx(-1.0)
    assert rows["uniform blend"]["personafuse_minus_this"] > 1.8 and rows["uniform blend"]["delta_ci_low"] > 1.5
    assert "best single expert (openness_high)" in rows


def test_spread_covers_the_list_evenly():
    assert spread(list(range(10)), 4) == [0, 3, 6, 9]
    assert spread([1, 2], None) == [1, 2] and spread([1, 2], 5) == [1, 2]


def test_reference_run_on_a_tiny_stack_writes_report_tables_and_plots(tmp_path):
    tokenizer = make_tiny_tokenizer()
    pf = PersonaFuseModel.from_base(make_tiny_llama(tokenizer), PersonaFuseConfig(router={"gating": "poles"}),
                                    tokenizer=tokenizer)
    train_path, heldout_path = bundled_seed_paths()
    train = load_situations(train_path)[:6]
    heldout = load_situations(heldout_path)
    situations = [*train, *[Situation.from_dict({**s.to_dict(), "split": "heldout"}) for s in heldout[:6]],
                  *[Situation.from_dict({**s.to_dict(), "split": "heldout_domain"}) for s in heldout[6:]]]
    settings = GenerationSettings(max_new_tokens=4, batch_size=6)
    results = reference_evaluation(pf, tokenizer, situations, tmp_path, settings, steer_situations=3, progress=False,
                                   mc_path=None)
    assert results["routing"]["heldout"]["n"] == 6 and results["routing"]["heldout_domain"]["n"] == 6
    assert results["steerability"]["situations"] == 3
    assert len(results["end_to_end"]["rows"]) == 6
    report = (tmp_path / "report.md").read_text()
    assert "## End to end" in report and "oracle prompt" in report
    for plot in ("steerability.png", "comparison.png", "routing_heatmap.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "results.json").read_text())["scorer"]["fitted_on"] == 12
    # Resumable: a second run generates nothing new (every reply comes from the cache).
    lines = (tmp_path / "cache" / "generations.jsonl").read_text().count("\n")
    reference_evaluation(pf, tokenizer, situations, tmp_path, settings, steer_situations=3, progress=False, mc_path=None)
    assert (tmp_path / "cache" / "generations.jsonl").read_text().count("\n") == lines
