"""The bundled situation corpus: built from its label passes, split by domain, free of near-duplicates."""

import json
import re

import pytest
import torch

from personafuse.data import load_situations
from personafuse.data.corpus import (
    CORPUS_DIR,
    HELDOUT_DOMAINS,
    acceptable_poles,
    agreement,
    assign_splits,
    build,
    cohens_kappa,
    corpus_path,
    final_activations,
    near_duplicates,
    needs_adjudication,
    situation_text,
)
from personafuse.data.schema import DataError
from personafuse.traits import BIG_FIVE

CALM = {"openness": 0.0, "conscientiousness": 0.3, "extraversion": -0.2, "agreeableness": 0.8, "neuroticism": -0.6}


def test_cohens_kappa_matches_a_hand_computed_value():
    # 10 items: observed agreement 0.8; both raters say "+" 5 times, "-" 5 times -> expected 0.5 -> kappa 0.6.
    a = [1, 1, 1, 1, 1, -1, -1, -1, -1, -1]
    b = [1, 1, 1, 1, -1, 1, -1, -1, -1, -1]
    assert cohens_kappa(a, b) == pytest.approx(0.6)
    assert cohens_kappa(a, a) == 1.0


def test_close_labels_are_averaged_and_conflicts_need_the_adjudicator():
    close = {**CALM, "agreeableness": 0.6}
    assert needs_adjudication(CALM, close) == []
    flipped = {**CALM, "neuroticism": 0.9, "agreeableness": 0.2}
    reasons = needs_adjudication(CALM, flipped)
    assert any("top trait" in r for r in reasons) and any("neuroticism sign" in r for r in reasons)
    final = final_activations({"x": CALM, "y": CALM}, {"x": close, "y": flipped}, {"y": close})
    assert final["x"]["agreeableness"] == 0.7 and final["y"] == close
    with pytest.raises(DataError, match="'y' needs adjudication"):
        final_activations({"y": CALM}, {"y": flipped}, {})


def test_agreement_reports_spearman_top_trait_and_sign_kappa():
    a = {"s1": CALM, "s2": {**CALM, "agreeableness": -0.9}, "s3": {**CALM, "extraversion": 0.95}}
    b = {"s1": CALM, "s2": {**CALM, "agreeableness": -0.7}, "s3": {**CALM, "agreeableness": 0.9, "extraversion": 0.5}}
    report = agreement(a, b)
    assert report["top_trait_agreement"] == pytest.approx(2 / 3) and report["adjudicated_ids"] == ["s3"]
    assert report["per_trait"]["extraversion"]["spearman"] == pytest.approx(1.0)
    assert report["per_trait"]["agreeableness"]["spearman"] == pytest.approx(3 ** 0.5 / 2)  # tied ranks
    assert report["per_trait"]["openness"]["spearman"] is None  # constant: undefined, not a fake 0 or 1


def test_splits_hold_out_whole_domains_and_a_stratified_share_of_the_rest():
    records = [{"id": f"{d}-{i:03d}", "domain": d, **({"responses": {}} if i < 10 else {})}
               for d in ("grief", "finance", HELDOUT_DOMAINS[0]) for i in range(30)]
    splits = assign_splits(records)
    assert assign_splits(records) == splits  # seeded
    for d in ("grief", "finance"):
        for with_replies in (True, False):
            ids = [r["id"] for r in records if r["domain"] == d and ("responses" in r) == with_replies]
            assert sum(splits[i] == "heldout" for i in ids) == round(0.2 * len(ids))
    assert {splits[r["id"]] for r in records if r["domain"] == HELDOUT_DOMAINS[0]} == {"heldout_domain"}


def test_near_duplicates_catch_template_fills_and_close_embeddings():
    texts = ["My flight to Lisbon got cancelled and the airline will not answer the phone at all.",
             "My flight to Madrid got cancelled and the airline will not answer the phone at all.",
             "Can you help me name a sourdough starter? Something silly please."]
    pairs = near_duplicates(texts)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)]
    embeddings = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]]), dim=-1)
    assert (1, 2) in [(i, j) for i, j, why in near_duplicates(["a b", "c d", "e f"], embeddings) if "cosine" in why]


def test_acceptable_poles_need_magnitude_and_sign():
    assert acceptable_poles(CALM) == {"agreeableness_high", "neuroticism_low"}


def test_build_rejects_an_authored_record_in_the_wrong_domain_file(tmp_path):
    (tmp_path / "authored").mkdir()
    (tmp_path / "authored" / "grief.jsonl").write_text(json.dumps(
        {"id": "g-1", "domain": "finance", "situation": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"grief.jsonl:1: field 'domain'"):
        build(tmp_path)


# --- the bundled corpus ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus():
    return load_situations(corpus_path())


def test_committed_corpus_equals_a_fresh_build_from_the_label_passes(corpus):
    assert [s.to_dict() for s in build()] == [s.to_dict() for s in corpus]
    report = json.loads((CORPUS_DIR / "agreement.json").read_text())
    assert report["situations"] == len(corpus)


def test_corpus_size_domains_splits_and_replies(corpus):
    domains = {s.domain for s in corpus}
    assert len(corpus) >= 600 and len(domains) >= 15
    train_domains = {s.domain for s in corpus if s.split != "heldout_domain"}
    held_domains = {s.domain for s in corpus if s.split == "heldout_domain"}
    assert held_domains == set(HELDOUT_DOMAINS) and not held_domains & train_domains
    assert {s.domain for s in corpus if s.split == "heldout"} == train_domains
    with_replies = [s for s in corpus if s.responses]
    assert len(with_replies) >= 200
    assert all(len(reply.split()) <= 80 for s in with_replies for reply in s.responses.values())


def test_every_pole_is_called_for_and_an_anxious_voice_only_for_fiction(corpus):
    counts = {name: sum(name in acceptable_poles(s.activations) for s in corpus) for name in BIG_FIVE.expert_names}
    assert min(counts.values()) >= 10, counts
    # The guideline allows an anxious voice only where the user asks for fiction or role-play.
    fiction = re.compile(r"role|play|pretend|character|scene|story|fiction|novel|writ|voice|script|monologue|poem|"
                         r"narrat|line|villain|rehears|improv|dialogue|you are|you're", re.IGNORECASE)
    anxious = [s for s in corpus if "neuroticism_high" in acceptable_poles(s.activations)]
    assert [s.id for s in anxious if not fiction.search(situation_text(s))] == []
    assert len(anxious) <= 0.1 * len(corpus)


def test_corpus_has_no_near_duplicates(corpus):
    from personafuse.eval.trait_expression import SentenceEncoder

    texts = [situation_text(s) for s in corpus]
    pairs = near_duplicates(texts, SentenceEncoder()(texts))
    assert not pairs, [(corpus[i].id, corpus[j].id, why) for i, j, why in pairs[:10]]
