"""APC score, discriminators, persona/label files, retriever, label synthesis (personafuse.apc)."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
import torch

from personafuse.apc import (
    NLI_LABELS,
    RELEVANCE_LABELS,
    APCScorer,
    Discriminator,
    DiscriminatorError,
    Persona,
    apc_terms,
    bundled_data_path,
    load_labelled,
    load_persona,
    load_personas,
)
from personafuse.apc.authored import (
    AUTHORED_DIR,
    NEGATIVES_PER_QUERY,
    expand_authored,
    load_authored,
    nli_rows,
    relevance_rows,
)
from personafuse.apc.distill import balanced_class_weights, split_rows
from personafuse.apc.dpo import build_pair, load_queries
from personafuse.apc.score import APCResult
from personafuse.apc.synthesis import parse_label, synthesize_labels
from personafuse.data import DataError
from tests.apc_tiny import FixedDiscriminator, tiny_bert_classifier

PERSONA = Persona("Mira", ("Mira keeps the lighthouse.", "Mira plays the accordion."))
REL = {"Mira keeps the lighthouse.": 0.9, "Mira plays the accordion.": 0.1}
# (entailed, contradicted) per statement for response "r1"
NLI = {"Mira keeps the lighthouse.": (0.7, 0.1), "Mira plays the accordion.": (0.2, 0.3)}


def fixed_scorer(rel=REL, nli=NLI) -> APCScorer:
    def rel_row(text):
        p = next(v for s, v in rel.items() if s in text)
        return [1 - p, p]

    def nli_row(text):
        ent, con = next(v for s, v in nli.items() if s in text)
        if "Response: r2" in text:  # a second response with everything entailed
            ent, con = 1.0, 0.0
        return [con, 1 - ent - con, ent]

    return APCScorer(FixedDiscriminator(RELEVANCE_LABELS, rel_row), FixedDiscriminator(NLI_LABELS, nli_row))


# ---- the formula -------------------------------------------------------------------------------
def test_formula_matches_hand_computed_values():
    scorer = fixed_scorer()
    r1, r2 = scorer.score(PERSONA, "Where do you live?", ["r1", "r2"])
    # 0.9*0.7 + 0.1*(1-0.1)  +  0.1*0.2 + 0.9*(1-0.3)
    assert r1.total == pytest.approx(0.63 + 0.09 + 0.02 + 0.63, abs=1e-6)
    assert [s.score for s in r1.statements] == pytest.approx([0.72, 0.65], abs=1e-6)
    assert r1.statements[0].active and not r1.statements[1].active
    assert r1.mean == pytest.approx(1.37 / 2, abs=1e-6)
    # fully entailed, never contradicted: every statement scores 1
    assert r2.total == pytest.approx(2.0, abs=1e-6)
    assert apc_terms(torch.tensor(0.5), torch.tensor(0.4), torch.tensor(0.2)).item() == pytest.approx(0.6)
    assert "P_rel=0.90" in r1.explain()


def test_zero_statements_scores_zero_without_discriminator_calls():
    scorer = fixed_scorer()
    results = scorer.score(Persona("Nobody", ()), "hi", ["a", "b"])
    assert [r.total for r in results] == [0.0, 0.0] and results[0].statements == ()
    assert scorer.relevance_model.calls == 0 and scorer.nli_model.calls == 0


def test_relevance_is_cached_per_query():
    scorer = fixed_scorer()
    scorer.score(PERSONA, "q1", ["r1", "r2", "r3"])
    assert scorer.relevance_model.calls == 1 and scorer.relevance_model.texts_scored == 2
    assert scorer.nli_model.texts_scored == 6  # S * R in one batch
    scorer.score(PERSONA, "q1", ["r4"])
    scorer.retrieve(PERSONA, "q1", k=1)
    assert scorer.relevance_model.calls == 1  # same query: cache hit
    scorer.score(PERSONA, "q2", ["r1"])
    assert scorer.relevance_model.calls == 2


def test_retriever_orders_by_relevance_and_keeps_file_order_on_ties():
    statements = ("s-a", "s-b", "s-c", "s-d")
    rel = {"s-a": 0.2, "s-b": 0.8, "s-c": 0.5, "s-d": 0.8}
    scorer = fixed_scorer(rel=rel, nli={s: (0.5, 0.1) for s in statements})
    persona = Persona("X", statements)
    assert [s for s, _ in scorer.retrieve(persona, "q", k=3)] == ["s-b", "s-d", "s-c"]
    assert [p for _, p in scorer.retrieve(persona, "q", k=10)] == pytest.approx([0.8, 0.8, 0.5, 0.2])


# ---- real tiny classifiers ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_discriminators(tmp_path_factory):
    root = tmp_path_factory.mktemp("disc")
    return tiny_bert_classifier(root / "rel", 2, seed=1), tiny_bert_classifier(root / "nli", 3, seed=2)


def test_tiny_classifiers_end_to_end(tiny_discriminators):
    rel, nli = tiny_discriminators
    scorer = APCScorer.from_pretrained(rel, nli, device="cpu", batch_size=3)
    persona = load_persona(bundled_data_path("personas.yaml"), "Tobias Wren")
    results = scorer.score(persona, "Do you have any pets?", ["I have a dog.", "I am allergic to cats.", "Hello."])
    assert len(results) == 3
    for r in results:
        assert len(r.statements) == 8 and 0 <= r.total <= 8
        assert r.total == pytest.approx(sum(s.score for s in r.statements), abs=1e-5)
    assert scorer.nli_model.calls == 8  # 24 texts in batches of 3
    top = scorer.retrieve(persona, "Do you have any pets?", k=4)
    assert len(top) == 4 and [p for _, p in top] == sorted((p for _, p in top), reverse=True)


def test_label_count_mismatch_names_the_checkpoint(tiny_discriminators):
    rel, nli = tiny_discriminators
    with pytest.raises(DiscriminatorError, match=r"nli.* has 3 output labels.*needs 2"):
        Discriminator.from_pretrained(nli, RELEVANCE_LABELS, device="cpu")
    with pytest.raises(DiscriminatorError, match=r"rel has 2 output labels.*needs 3"):
        APCScorer.from_pretrained(rel, rel, device="cpu")


def test_overlong_response_is_truncated_with_a_warning(tmp_path, caplog):
    short = tiny_bert_classifier(tmp_path / "short", 3, max_positions=32)
    disc = Discriminator.from_pretrained(short, NLI_LABELS, device="cpu")
    assert disc.max_length == 32
    scorer = APCScorer(FixedDiscriminator(RELEVANCE_LABELS, lambda t: [0.5, 0.5]), disc)
    with caplog.at_level(logging.WARNING):
        result = scorer.score_one(PERSONA, "q", "very long reply " * 200)
    assert 0 <= result.total <= 2
    assert "truncated" in caplog.text


# ---- files ---------------------------------------------------------------------------------------
def test_bundled_data_is_valid():
    personas = load_personas(bundled_data_path("personas.yaml"))
    assert len(personas) >= 3 and all(len(p.statements) >= 8 for p in personas.values())
    assert {r["label"] for r in load_labelled(bundled_data_path("relevance.jsonl"), "relevance")} == {"yes", "no"}
    assert {r["label"] for r in load_labelled(bundled_data_path("nli.jsonl"), "nli")} == set(NLI_LABELS)
    for name in personas:
        assert load_queries(bundled_data_path("queries.jsonl"), name, "heldout")
    # enough held-out APC-DPO queries for a bootstrap CI on the before/after difference
    assert len(load_queries(bundled_data_path("queries.jsonl"), split="heldout")) >= 20


def test_bundled_labels_are_the_expansion_of_the_authored_dialogue():
    """The committed JSONL is what ``python -m personafuse.apc.authored`` writes (edit the YAML, rerun it)."""
    expanded = expand_authored()
    for kind in ("relevance", "nli"):
        assert load_labelled(bundled_data_path(f"{kind}.jsonl"), kind) == expanded[kind]
    personas = load_personas(bundled_data_path("personas.yaml"))
    authored = [load_authored(path, personas) for path in sorted(AUTHORED_DIR.glob("*.yaml"))]
    assert sorted(d.persona.character for d in authored) == sorted(personas)  # every character has dialogue
    for dialogue in authored:
        primaries = Counter(q.needs[0] for q in dialogue.queries if q.needs)
        assert set(primaries) == set(range(len(dialogue.persona.statements)))  # every statement has queries
        assert min(primaries.values()) >= 3
        bundled_queries = load_queries(bundled_data_path("queries.jsonl"), dialogue.persona.character)
        assert set(bundled_queries) <= {q.query for q in dialogue.queries}  # the DPO queries are labelled too


def test_authored_expansion_labels(tmp_path):
    personas = {"A": Persona("A", ("A is tall.", "A sings.", "A rows."))}
    path = tmp_path / "a.yaml"
    path.write_text(json.dumps({"character": "A", "neutral": ["Hm.", "Who knows?"], "queries": [
        {"query": "Do you sing?", "needs": [1], "entailed": "I sing daily.", "contradicted": "I never sing."},
        {"query": "Weather?", "needs": []}]}))  # JSON is YAML
    dialogue = load_authored(path, personas)
    relevance = relevance_rows(dialogue)
    assert [(r["statement"], r["query"], r["label"]) for r in relevance if r["label"] == "yes"] == [("A sings.", "Do you sing?", "yes")]
    # the statements a query does not need, at most NEGATIVES_PER_QUERY of them: 2 of 2, then 2 of 3
    assert NEGATIVES_PER_QUERY == 2 and sum(r["label"] == "no" for r in relevance) == 2 + 2
    nli = {(r["statement"], r["response"]): r["label"] for r in nli_rows(dialogue)}
    assert nli[("A sings.", "I sing daily.")] == "entailed" and nli[("A sings.", "I never sing.")] == "contradicted"
    assert nli[("A sings.", "Hm.")] == "neutral"
    borrowed = [(s, r) for (s, r), label in nli.items() if s != "A sings." and r == "I sing daily."]
    assert len(borrowed) == 1 and nli[borrowed[0]] == "neutral"

    path.write_text(json.dumps({"character": "A", "neutral": ["Hm."], "queries": [
        {"query": "Do you sing?", "needs": [3], "entailed": "a", "contradicted": "b"}]}))
    with pytest.raises(DataError, match=r"a.yaml: field 'queries\[0\].needs': expected distinct statement indices in \[0, 3\)"):
        load_authored(path, personas)
    path.write_text(json.dumps({"character": "A", "neutral": ["Hm."], "queries": [
        {"query": "Do you sing?", "needs": [1], "entailed": "a"}]}))
    with pytest.raises(DataError, match=r"field 'queries\[0\].contradicted': a query that needs a statement"):
        load_authored(path, personas)
    path.write_text("character: B\nneutral: [Hm.]\nqueries: []\n")
    with pytest.raises(DataError, match=r"field 'character': unknown character 'B'"):
        load_authored(path, personas)


def test_bundled_label_counts():
    """7 characters x 8 statements x 4 queries: one entailed and one contradicted NLI row per answered query."""
    nli = Counter(r["label"] for r in load_labelled(bundled_data_path("nli.jsonl"), "nli"))
    answered = 7 * 8 * 4
    assert nli["entailed"] == nli["contradicted"] == answered
    generic = 3 * 5 + 4 * 4
    assert nli["neutral"] == 2 * answered + generic  # a neutral and a borrowed reply per answered query
    relevance = Counter(r["label"] for r in load_labelled(bundled_data_path("relevance.jsonl"), "relevance"))
    assert relevance["no"] == NEGATIVES_PER_QUERY * (answered + generic)


def test_split_holds_out_whole_queries():
    rows = [{"character": c, "query": f"q{i}", "label": label} for c in "AB" for i in range(10)
            for label in ("entailed", "contradicted", "neutral")]
    train, heldout = split_rows(rows, 0.2, seed=3)
    assert len(heldout) == 12 and len(train) == 48  # 4 whole queries of 3 rows
    assert not {(r["character"], r["query"]) for r in train} & {(r["character"], r["query"]) for r in heldout}
    assert split_rows(rows, 0.2, seed=3) == (train, heldout)
    train, heldout = split_rows(rows, 0.25, seed=3, group_by=())  # single rows
    assert len(heldout) == 15 and sorted(map(str, train + heldout)) == sorted(map(str, rows))
    with pytest.raises(ValueError, match="at least 2 groups"):
        split_rows(rows[:3], 0.5)


def test_balanced_class_weights():
    rows = [{"label": "neutral"}] * 6 + [{"label": "entailed"}] * 3
    # n / (classes * count): no contradicted rows -> 0; 9 / (3 * 6) = 0.5; 9 / (3 * 3) = 1
    assert balanced_class_weights(rows, "nli").tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_persona_files_load_and_fail_with_file_and_line(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"character": "A", "statement": "A is tall."}\n\n{"character": "A", "statement": "A sings."}\n')
    assert load_persona(jsonl).statements == ("A is tall.", "A sings.")

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(DataError, match="empty.yaml: no persona statements"):
        load_personas(empty)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no persona statements"):
        load_personas(tmp_path / "empty.jsonl")

    bad = tmp_path / "bad.yaml"
    bad.write_text("- character: A\n  statements:\n    - A is tall.\n    - ''\n")
    with pytest.raises(DataError, match=r"bad.yaml:4: field 'statements\[1\]'"):
        load_personas(bad)
    bad.write_text("character: A\nstatements: []\n")
    with pytest.raises(DataError, match=r"bad.yaml:1: field 'statements'"):
        load_personas(bad)
    jsonl.write_text('{"character": "A", "statement": "A is tall."}\n{"character": "A", "statment": "x"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'statment': unknown field"):
        load_personas(jsonl)


def test_labelled_rows_fail_with_file_line_and_field(tmp_path):
    path = tmp_path / "nli.jsonl"
    row = {"character": "A", "statement": "A is tall.", "query": "q", "response": "r", "label": "entailed"}
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "label": "yes"}) + "\n")
    with pytest.raises(DataError, match=r"nli.jsonl:2: field 'label': expected one of"):
        load_labelled(path, "nli")
    path.write_text(json.dumps(row) + "\n{oops\n")
    with pytest.raises(DataError, match=r"nli.jsonl:2: invalid JSON"):
        load_labelled(path, "nli")


# ---- pairs -----------------------------------------------------------------------------------------
def results(*totals):
    return [APCResult("q", f"r{i}", t, ()) for i, t in enumerate(totals)]


def test_pair_builder_margin_ties_and_sample_counts():
    assert build_pair(results(1.0), 0.2) is None  # n = 1 cannot pair
    best, worst = build_pair(results(1.5, 1.0), 0.2)  # n = 2
    assert (best.response, worst.response) == ("r0", "r1")
    assert build_pair(results(1.1, 1.0), 0.2) is None  # gap 0.1 <= δ
    assert build_pair(results(1.2, 1.0), 0.2) is None  # gap exactly δ is not above it
    best, worst = build_pair(results(1.0, 3.0, 0.5, 2.0), 0.2)  # n = 4: best vs worst, middle ignored
    assert (best.response, worst.response) == ("r1", "r2")
    best, worst = build_pair(results(2.0, 2.0, 1.0, 1.0), 0.2)  # ties: first best, last worst
    assert (best.response, worst.response) == ("r0", "r3")
    assert build_pair(results(1.0, 1.0, 1.0, 1.0), 0.0) is None  # all tied: never a pair


# ---- label synthesis ---------------------------------------------------------------------------
class ScriptedTeacher:
    """Answers each synthesis prompt the way a teacher would, deterministically."""

    def __init__(self):
        self.calls = 0

    def generate(self, conversations, **sampling):
        self.calls += 1
        out = []
        for c in conversations:
            p = c[-1]["content"]
            if p.startswith("Given the passage"):
                out.append("- Ada keeps bees.\n- Ada rows on the river.\nThat is all.")
            elif p.startswith("Persona Statement"):
                topic = "bees" if "bees" in p else "rowing"
                out.append(f'1. "Tell me about your {topic}?"\n2. "Do you like {topic}?"')
            elif "Only answer \"yes\" or \"no\"" in p:
                out.append("No")
            elif "Formalize the responses" in p:
                out.append('Sure: {"entailed": "I keep bees.", "neutral": "Nice day.", "contradicted": "I hate bees."}')
            else:
                out.append("Entailed." if "I keep bees." in p else "contradict" if "hate" in p else "neutral")
        return out


def test_label_synthesis_writes_valid_rows_and_resumes(tmp_path):
    teacher = ScriptedTeacher()
    paths = synthesize_labels(teacher, "Ada", tmp_path, profile="Ada keeps bees.\n\nAda rows.", negatives=1, borrowed=1)
    rel, nli = load_labelled(paths["relevance"], "relevance"), load_labelled(paths["nli"], "nli")
    assert {r["statement"] for r in rel} == {"Ada keeps bees.", "Ada rows on the river."}
    assert sum(r["label"] == "yes" for r in rel) == 4 and sum(r["label"] == "no" for r in rel) == 2
    assert {r["label"] for r in nli} == set(NLI_LABELS) and len(nli) == 4 * 3 + 2
    calls = teacher.calls
    synthesize_labels(teacher, "Ada", tmp_path, statements=["Ada keeps bees.", "Ada rows on the river."])
    assert teacher.calls == calls and len(load_labelled(paths["relevance"], "relevance")) == len(rel)
    assert parse_label("Yes, and no.", ("no", "yes")) is None
