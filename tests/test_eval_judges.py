"""Judge-output parsing: malformed or missing scores are counted and excluded, never crash."""

import numpy as np
import pytest

from personafuse import PersonaFuseConfig, PersonaFuseModel
from personafuse.data import OpenAIChatGenerator, bundled_seed_paths, load_situations
from personafuse.eval import GenerationSettings, ResultFile, standard_candidates
from personafuse.eval.adherence import (
    evaluate_pairwise,
    evaluate_persona_adherence,
    judge_sanity_check,
    load_adherence,
    load_pairwise,
    load_role_identification,
)
from personafuse.eval.io import sample_path
from personafuse.eval.judges import CachedJudge, parse_choice, parse_rating
from personafuse.eval.trait_expression import JudgeTraitScorer, trait_agreement
from tests.eval_tiny import ScriptedJudge
from tests.openai_fixture_server import FakeOpenAIServer
from tests.test_model import CFG
from tests.tiny import make_tiny_llama, make_tiny_tokenizer


@pytest.mark.parametrize("text, expected", [
    ("Score: 4", 4.0), ('{"score": 5, "why": "great"}', 5.0), ("I'd give it 3/5.", 3.0), ("**2**", 2.0),
    ("rating = 4.5", 4.5), ("5", 5.0), ("Score: 9", None), ("6", None), ("", None), ("great reply!", None),
    ("It has 2 strengths and 3 flaws", None), ('{"score": "high"}', None),
])
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Answer: B", 1), ("I prefer Response A.", 0), ("A", 0), ("a good reply is B", 1), ("**B**", 1),
    ("Choice: (A)", 0), ("A or B, hard to say", None), ("", None), ("neither", None),
])
def test_parse_choice(text, expected):
    assert parse_choice(text, ["A", "B"]) == expected


def test_parse_choice_names():
    assert parse_choice("The next line is the Doctor's.", ["Doctor", "Patient"]) == 0
    assert parse_choice("role: patient", ["Doctor", "Patient"]) == 1


def test_trait_judge_through_an_openai_server_excludes_malformed_replies():
    situations = load_situations(bundled_seed_paths()[1])[:4]
    replies = iter(['{"openness": 0.5, "conscientiousness": 0, "extraversion": 0, "agreeableness": 1, "neuroticism": -1}',
                    "I think this reply is quite agreeable.",
                    '{"openness": 3, "conscientiousness": 0, "extraversion": 0, "agreeableness": 0, "neuroticism": 0}',
                    '```json\n{"openness": -0.5, "conscientiousness": 0.2, "extraversion": 0.1, "agreeableness": 0.3, '
                    '"neuroticism": 0}\n```'])
    with FakeOpenAIServer(answer=lambda messages: next(replies)) as server:
        judge = JudgeTraitScorer(OpenAIChatGenerator(server.base_url, "judge", concurrency=1, max_retries=0))
        scores = judge.score(["r1", "r2", "r3", "r4"], [s.situation for s in situations])
    assert judge.tally.parsed == 2 and judge.tally.malformed == 2
    assert np.isnan(scores[1].numpy()).all() and np.isnan(scores[2].numpy()).all()
    result = trait_agreement(scores.numpy(), np.ones((4, 5)), judge.traits)
    assert result["n"] == 2 and result["excluded"] == 2


def test_adherence_averages_judges_and_excludes_malformed(tmp_path):
    tok = make_tiny_tokenizer()
    pf = PersonaFuseModel.from_base(make_tiny_llama(tok), PersonaFuseConfig(**CFG), tokenizer=tok).eval()
    items = load_adherence(sample_path("persona_adherence.jsonl"))
    judges = {"four": ScriptedJudge(lambda c: "Score: 4"),
              "flaky": ScriptedJudge(lambda c: "Score: 2" if "accountant" in c[1]["content"] else "no idea")}
    out = evaluate_persona_adherence(standard_candidates(pf, tok, ["base"]), items, judges,
                                     ResultFile(tmp_path / "a.jsonl"), GenerationSettings(max_new_tokens=2))
    base = out["candidates"]["base"]
    assert base["tasks"]["expected_action"] == 4.0 and base["tasks"]["action_justification"] == 3.0
    assert base["persona_score"] == pytest.approx((4 * 4 + 3) / 5)
    assert out["judges"]["flaky"]["malformed"] == 4 and out["judges"]["four"]["malformed"] == 0


def test_pairwise_for_judges_and_reward_models():
    items = load_pairwise(sample_path("pairwise.jsonl"))
    always_a = ScriptedJudge(lambda c: "Answer: A")
    broken = ScriptedJudge(lambda c: "Both are fine.")
    shorter = lambda persona, query, response: -len(response)  # noqa: E731  (the gold replies are the longer ones)
    out = evaluate_pairwise(items, {"always_a": always_a, "broken": broken}, {"shorter": shorter})
    assert out["always_a"]["accuracy"] == 0.5 and out["always_a"]["n"] == 4
    assert out["broken"]["accuracy"] is None and out["broken"]["malformed"] == 4
    assert out["shorter"] == {"kind": "reward_model", "accuracy": 0.0, "n": 4}


def test_judge_sanity_check_verdict():
    items = load_role_identification(sample_path("role_identification.jsonl"))
    good = ScriptedJudge(lambda c: "Sailor" if "rope is jammed" in c[0]["content"] else c[0]["content"].split("Options: ")[1].split(",")[0])
    assert judge_sanity_check(good, items)["trusted"] is True
    lazy = ScriptedJudge(lambda c: "hmm")
    verdict = judge_sanity_check(lazy, items)
    assert verdict["trusted"] is False and verdict["malformed"] == 4 and verdict["chance"] == 0.5


def test_cached_judge_asks_each_conversation_once_and_resumes(tmp_path):
    asked = ScriptedJudge(lambda c: f"seen {c[0]['content']}")
    convs = [[{"role": "user", "content": t}] for t in ("x", "y", "x", "z")]
    judge = CachedJudge(asked, "j", ResultFile(tmp_path / "j.jsonl"), chunk=2)
    assert judge.generate(convs, temperature=0) == ["seen x", "seen y", "seen x", "seen z"]
    assert [c[0]["content"] for c in asked.asked] == ["x", "y", "z"]
    again = CachedJudge(ScriptedJudge(lambda c: "new"), "j", ResultFile(tmp_path / "j.jsonl"))
    assert again.generate(convs[:2], temperature=0) == ["seen x", "seen y"]
    assert again.generate(convs[:1], temperature=0.7) == ["new"]  # other sampling settings: asked anew
    assert CachedJudge(ScriptedJudge(lambda c: "k"), "k", ResultFile(tmp_path / "j.jsonl")).generate(convs[:1]) == ["k"]
