import json
import os

import pytest
import torch

from personafuse.data import (
    DataError,
    Situation,
    blend_sft_rows,
    bundled_seed_paths,
    expert_sft_rows,
    load_situations,
    save_situations,
)
from personafuse.traits import BIG_FIVE, get_trait_set


def record(i=0, **changes):
    """A valid Big Five record; ``changes`` override fields (value ``None`` deletes one)."""
    base = {
        "id": f"s{i}",
        "domain": "work",
        "split": "train",
        "situation": [{"role": "system", "content": "Office chat."},
                      {"role": "user", "content": f"My manager moved deadline {i} up a week."}],
        "responses": {name: f"{name} reply {i}" for name in BIG_FIVE.expert_names},
        "activations": {"openness": 0.1, "conscientiousness": 0.8, "extraversion": -0.2,
                        "agreeableness": 0.5, "neuroticism": -0.9},
        "response": "Let's plan it calmly.",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_valid_file_round_trips_atomically(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [record(0), "", record(1, split="heldout", response=None)])
    situations = load_situations(path)
    assert [s.id for s in situations] == ["s0", "s1"]
    assert [s.id for s in load_situations(path, split="heldout")] == ["s1"]
    out = tmp_path / "copy.jsonl"
    save_situations(out, situations)
    assert load_situations(out) == situations
    assert sorted(os.listdir(tmp_path)) == ["copy.jsonl", "data.jsonl"]  # no temp file left behind


def test_save_keeps_old_file_when_writing_fails(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [record(0)])

    def broken():
        yield Situation.from_dict(record(1))
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_situations(path, broken())
    assert [s.id for s in load_situations(path)] == ["s0"]
    assert os.listdir(tmp_path) == ["data.jsonl"]


def test_gates_only_record_uses_normalised_gates(tmp_path):
    gates = {"agreeableness_high": 3.0, "neuroticism_low": 1.0}
    path = write_lines(tmp_path / "g.jsonl", [record(0, activations=None, gates=gates)])
    [s] = load_situations(path)
    targets = s.gate_targets(BIG_FIVE)
    assert targets[BIG_FIVE.index("agreeableness_high")] == pytest.approx(0.75)
    assert targets[BIG_FIVE.index("neuroticism_low")] == pytest.approx(0.25)
    assert targets.sum() == pytest.approx(1.0)
    activation = dict(zip(BIG_FIVE.traits, s.activation_vector(BIG_FIVE).tolist(), strict=True))
    assert activation == pytest.approx({"openness": 0.0, "conscientiousness": 0.0, "extraversion": 0.0,
                                        "agreeableness": 0.75, "neuroticism": -0.25})


def test_gate_targets_from_activations_follow_the_trait_set():
    s = Situation.from_dict(record(0))
    expected = BIG_FIVE.activations_to_gate_targets(torch.tensor([0.1, 0.8, -0.2, 0.5, -0.9]), 0.5)
    assert torch.allclose(s.gate_targets(BIG_FIVE, temperature=0.5), expected)
    targets = s.gate_targets(BIG_FIVE)
    assert targets.argmax() == BIG_FIVE.index("neuroticism_low")
    highs = get_trait_set("big_five", [f"{t}_high" for t in BIG_FIVE.traits])
    high_only = Situation.from_dict(record(0), highs)  # a both-pole file also serves a high-poles set
    assert high_only.gate_targets(highs).shape == (5,)
    assert torch.equal(high_only.activation_vector(highs), torch.tensor([0.1, 0.8, -0.2, 0.5, -0.9]))


def test_sft_rows_are_trl_conversational_prompt_completion():
    situations = [Situation.from_dict(record(0)), Situation.from_dict(record(1, response=None))]
    rows = expert_sft_rows(situations, "agreeableness_low")
    assert rows[0] == {"prompt": record(0)["situation"],
                       "completion": [{"role": "assistant", "content": "agreeableness_low reply 0"}]}
    assert len(rows) == 2
    assert blend_sft_rows(situations) == [{"prompt": record(0)["situation"],
                                           "completion": [{"role": "assistant", "content": "Let's plan it calmly."}]}]
    with pytest.raises(KeyError, match="agreeableness_medium"):
        expert_sft_rows(situations, "agreeableness_medium")


def test_bundled_seed_paths_point_into_the_package():
    train, heldout = bundled_seed_paths()
    assert (train.name, heldout.name) == ("situations.jsonl", "heldout.jsonl")
    assert train.parent.name == "seed" and train.parent.parent.name == "data"


def _responses_without(name):
    return {k: v for k, v in record()["responses"].items() if k != name}


BAD_RECORDS = {
    "missing field": (record(domain=None), "domain", "missing required field"),
    "unknown field": (record(activation={}), "activation", "unknown field"),
    "empty id": (record(id=" "), "id", "non-empty string"),
    "bad split": (record(split="test"), "split", "'train', 'heldout'"),
    "empty situation": (record(situation=[]), "situation", "non-empty list"),
    "bad role": (record(situation=[{"role": "bot", "content": "x"}, {"role": "user", "content": "y"}]),
                 "situation[0].role", "'system', 'user', 'assistant'"),
    "empty content": (record(situation=[{"role": "user", "content": ""}]), "situation[0].content", "non-empty"),
    "extra message key": (record(situation=[{"role": "user", "content": "x", "name": "a"}]), "situation[0]",
                          "exactly 'role' and 'content'"),
    "last not user": (record(situation=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]),
                      "situation[1].role", "last message must be from the user"),
    "missing pole": (record(responses=_responses_without("openness_low")), "responses.openness_low",
                     "missing response for pole 'openness_low'"),
    "empty pole reply": (record(responses={**record()["responses"], "openness_low": ""}), "responses.openness_low",
                         "non-empty string"),
    "unknown expert": (record(responses={**record()["responses"], "humour_high": "ha"}), "responses.humour_high",
                       "unknown expert 'humour_high'"),
    "unknown trait": (record(activations={**record()["activations"], "humour": 0.1}), "activations.humour",
                      "unknown trait 'humour'"),
    "missing trait": (record(activations={"openness": 0.1}), "activations.conscientiousness",
                      "missing activation for trait 'conscientiousness'"),
    "out of range": (record(activations={**record()["activations"], "openness": 1.5}), "activations.openness",
                     "in [-1, 1], got 1.5"),
    "non-finite": ('{"id": "s0", "domain": "work", "split": "train", '
                   '"situation": [{"role": "user", "content": "x"}], '
                   f'"responses": {json.dumps(record()["responses"])}, '
                   '"activations": {"openness": NaN, "conscientiousness": 0, "extraversion": 0, '
                   '"agreeableness": 0, "neuroticism": 0}}', "activations.openness", "finite number"),
    "bool activation": (record(activations={**record()["activations"], "openness": True}), "activations.openness",
                        "finite number"),
    "both labels": (record(gates={"openness_high": 1.0}), "activations", "exactly one of"),
    "no labels": (record(activations=None), "activations", "exactly one of"),
    "negative gate": (record(activations=None, gates={"openness_high": -1}), "gates.openness_high", ">= 0"),
    "zero gates": (record(activations=None, gates={"openness_high": 0}), "gates", "positive sum"),
    "unknown gate": (record(activations=None, gates={"openness_mid": 1}), "gates.openness_mid", "unknown expert"),
    "empty response": (record(response=""), "response", "non-empty string"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_each_validation_error_names_file_line_and_field(tmp_path, case):
    bad, field, expected = BAD_RECORDS[case]
    path = write_lines(tmp_path / "bad.jsonl", [record(7), "  ", bad])
    with pytest.raises(DataError) as info:
        load_situations(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: field {field!r}: "), message
    assert expected in message
    assert (info.value.path, info.value.line, info.value.field) == (path, 3, field)
    assert isinstance(info.value, ValueError)


def test_bad_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [record(0), '{"id": "s1",'])
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON .*one JSON object per line"):
        load_situations(path)


def test_non_object_line_is_rejected(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=rf"^{path}:1: expected a JSON object, got list"):
        load_situations(path)


def test_duplicate_id_names_both_lines(tmp_path):
    path = write_lines(tmp_path / "dup.jsonl", [record(0), record(1), record(0)])
    with pytest.raises(DataError, match=rf"^{path}:3: field 'id': duplicate id 's0', first used on line 1$"):
        load_situations(path)


def test_unknown_split_filter_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        load_situations(tmp_path / "unused.jsonl", split="validation")
