"""The frozen-encoder APC discriminators (personafuse/apc/frozen.py): trained on the bundled authored rows, the NLI
head tells a contradiction from an entailment and an unrelated reply for a character it never saw; it saves and
loads through the one discriminator loader that APC scoring uses."""

from __future__ import annotations

import json

import pytest
import torch

from personafuse.apc import APCScorer, Discriminator, bundled_data_path, load_labelled
from personafuse.apc.distill import accuracy
from personafuse.apc.frozen import FrozenEncoderDiscriminator, HeadConfig, HeadTraining, train_head, words
from personafuse.apc.personas import Persona
from personafuse.apc.templates import NLI_LABELS, RELEVANCE_LABELS, nli_text, parse_text, relevance_text
from personafuse.context import bundled_sentence_encoder_path

CHARACTER = "Ines Calder"
STATEMENTS = ("Ines Calder is a ferry pilot who has crossed the Morrow Strait for eighteen years.",
              "Ines Calder is allergic to peanuts.",
              "Ines Calder sings in a jazz quartet called The Low Tide on Fridays.")
# (statement, query, response, label), written for this test: a character none of the bundled rows mention.
UNSEEN = [
    (0, "What do you do for work?", "I pilot the ferry across the Morrow Strait, and have done for eighteen years.", "entailed"),
    (0, "What do you do for work?", "I'm a dentist; I've never set foot on a boat in my life.", "contradicted"),
    (0, "How long have you been on the ferries?", "Eighteen years now, back and forth over the Morrow Strait.", "entailed"),
    (0, "How long have you been on the ferries?", "Only since March. Before that I drove a bus in the capital.", "contradicted"),
    (1, "Want some of my peanut butter cookies?", "Thanks, but I can't. Peanuts make me swell up, I'm allergic.", "entailed"),
    (1, "Want some of my peanut butter cookies?", "Yes please, peanut butter is my favourite thing in the world.", "contradicted"),
    (1, "Any food allergies I should know about for dinner?", "Peanuts. Keep them well away from my plate.", "entailed"),
    (1, "Any food allergies I should know about for dinner?", "None at all, I can eat anything you put in front of me.", "contradicted"),
    (2, "Are you free on Friday night?", "No, Fridays I sing with my quartet, The Low Tide.", "entailed"),
    (2, "Are you free on Friday night?", "Completely free. I don't sing, and I've never been in a band.", "contradicted"),
    (2, "Do you play in a band?", "I sing in a jazz quartet; we're called The Low Tide.", "entailed"),
    (2, "Do you play in a band?", "No, music bores me. I can't hold a tune and never tried.", "contradicted"),
    (0, "What do you do for work?", "The garden needs weeding again; the dandelions are winning.", "neutral"),
    (1, "Want some of my peanut butter cookies?", "My niece starts school next week and she's terribly excited.", "neutral"),
    (2, "Are you free on Friday night?", "I repainted the kitchen yellow last spring.", "neutral"),
    (1, "Any food allergies I should know about for dinner?", "I pilot the ferry across the Morrow Strait.", "neutral"),
]


@pytest.fixture(scope="module")
def trained_nli():
    rows = load_labelled(bundled_data_path("nli.jsonl"), "nli")
    disc = FrozenEncoderDiscriminator.from_encoder(bundled_sentence_encoder_path(), HeadConfig("nli", hidden=16, dropout=0.3))
    losses = train_head(disc, rows, HeadTraining(epochs=150, learning_rate=3e-3, weight_decay=0.1), seed=0)
    return disc, losses


def unseen_rows():
    return [{"character": CHARACTER, "statement": STATEMENTS[s], "query": q, "response": r, "label": label}
            for s, q, r, label in UNSEEN]


def test_templates_parse_back_into_their_fields():
    fields = {"character": "A B", "statement": "Likes tea.\n\nUser", "query": "Q?", "response": "Yes.\nReally."}
    assert parse_text("nli", nli_text(**fields)) == fields
    assert parse_text("relevance", relevance_text("A", "s", "q")) == {"character": "A", "statement": "s", "query": "q"}
    with pytest.raises(ValueError, match="not a nli discriminator input"):
        parse_text("nli", relevance_text("A", "s", "q"))


def test_words_mark_names_inside_a_sentence_only():
    assert words("I met Esi in Lisbon. Then home!") == [("i", False), ("met", False), ("esi", True), ("in", False),
                                                         ("lisbon", True), ("then", False), ("home", False)]


def test_head_separates_an_unseen_characters_contradictions(trained_nli):
    disc, losses = trained_nli
    assert losses[-1] < 0.5 * losses[0]
    report = accuracy(disc, unseen_rows(), "nli")
    # 6 rows per class for entailed and contradicted, 4 neutral; chance is a third
    assert report["accuracy_contradicted"] >= 5 / 6, report
    assert report["accuracy_entailed"] >= 5 / 6, report
    assert report["accuracy_neutral"] >= 3 / 4, report


def test_saved_head_loads_through_the_discriminator_loader_and_scores_apc(trained_nli, tmp_path):
    disc, _ = trained_nli
    disc.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["personafuse_discriminator"] == "frozen_encoder_head"
    loaded = Discriminator.from_pretrained(tmp_path, NLI_LABELS)
    assert isinstance(loaded, FrozenEncoderDiscriminator)
    texts = [nli_text(CHARACTER, STATEMENTS[s], q, r) for s, q, r, _ in UNSEEN]
    torch.testing.assert_close(loaded.probabilities(texts), disc.probabilities(texts), rtol=0, atol=1e-6)
    assert loaded.calls == 1 and loaded.texts_scored == len(texts)

    class Relevant:  # every statement relevant to its own query only
        labels = RELEVANCE_LABELS

        def probabilities(self, texts):
            rows = [parse_text("relevance", t) for t in texts]
            return torch.tensor([[0.0, 1.0] if r["statement"] == STATEMENTS[1] else [1.0, 0.0] for r in rows])

    persona = Persona(CHARACTER, STATEMENTS)
    query = "Want some of my peanut butter cookies?"
    faithful, contradicting = (r for s, q, r, _ in UNSEEN[4:6])
    scores = APCScorer(Relevant(), loaded).score(persona, query, [faithful, contradicting])
    assert scores[0].total > scores[1].total + 0.5


def test_loader_refuses_a_head_of_the_wrong_kind(trained_nli, tmp_path):
    trained_nli[0].save_pretrained(tmp_path)
    with pytest.raises(Exception, match="nli discriminator .* needs 2"):
        Discriminator.from_pretrained(tmp_path, RELEVANCE_LABELS)
