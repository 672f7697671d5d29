"""Evaluation metrics against hand-computed values, input validation and resumable result files."""

import json
import math

import numpy as np
import pytest

from personafuse.data import DataError
from personafuse.eval.capability import convert_mmlu, load_multiple_choice
from personafuse.eval.io import ResultFile, read_records
from personafuse.eval.metrics import bootstrap_ci, paired_delta, pearson, ranks, spearman, top_index_accuracy
from personafuse.eval.routing import rank_agreement
from personafuse.eval.safety import load_safety_prompts
from personafuse.eval.trait_expression import trait_agreement


def test_pearson_by_hand():
    # dx = [-1, 0, 1], dy = [-7/3, -1/3, 8/3]: r = 5 / sqrt(2 * 114/9)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    assert pearson([1], [2]) is None


def test_spearman_averages_tied_ranks():
    assert ranks([3, 1, 2, 2]).tolist() == [4, 1, 2.5, 2.5]
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]: r = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3], [10, 20, 1000]) == pytest.approx(1.0)


def test_top_index_accuracy():
    assert top_index_accuracy(np.array([[0.1, -0.9], [0.5, 0.2]]), np.array([[0, 1], [0, -1]])) == 0.5


def test_bootstrap_known_cases():
    assert bootstrap_ci([0.7] * 10) == (pytest.approx(0.7), pytest.approx(0.7))
    # Means of two draws from {0, 1} are 0, 0.5, 1 with probability 1/4, 1/2, 1/4: the 95% bounds are 0 and 1.
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    low, high = bootstrap_ci([0, 1] * 50, resamples=4000)
    assert low == pytest.approx(0.5 - 1.96 * 0.05, abs=0.02) and high == pytest.approx(0.5 + 1.96 * 0.05, abs=0.02)
    assert bootstrap_ci([0, 1] * 50, seed=3) == bootstrap_ci([0, 1] * 50, seed=3)
    delta = paired_delta([1, 1, 0, 1], [0.5, 0.5, -0.5, 0.5])
    assert delta["delta"] == 0.5 and delta["ci_low"] == pytest.approx(0.5) and delta["ci_high"] == pytest.approx(0.5)


def test_trait_agreement_by_hand():
    expressed = [[0.5, -0.2], [-0.4, 0.9], [0.1, 0.1], [float("nan"), 0.0]]
    target = [[1.0, 0.0], [0.0, -1.0], [0.2, 0.6], [1.0, 1.0]]
    r = trait_agreement(expressed, target, ["a", "b"])
    assert r["n"] == 3 and r["excluded"] == 1
    assert r["per_trait_pearson"]["a"] == pytest.approx(0.44 / math.sqrt(0.56 * 0.61 / 1.5), rel=1e-4)
    # top target trait: a, b, b; top expressed: a, b, a (tie -> first): 2 of 3
    assert r["top_trait_accuracy"] == pytest.approx(2 / 3)
    # expressed sign on the top target trait: + vs +, + vs -, + vs +
    assert r["pole_agreement"] == pytest.approx(2 / 3)
    cosines = [0.5 / math.sqrt(0.29), -0.9 / math.sqrt(0.97), 0.08 / (math.sqrt(0.02) * math.sqrt(0.4))]
    assert r["cosine"] == pytest.approx(sum(cosines) / 3)


def test_rank_agreement():
    out = rank_agreement([[0.1, 0.5, 0.9], [0.3, 0.2, 0.1]], [[0, 1, 2], [3, 2, 1]], ["x", "y", "z"])
    assert out["situation_spearman"] == pytest.approx(1.0)
    assert out["per_trait_spearman"]["x"] == pytest.approx(1.0)
    assert out["per_trait_spearman"]["y"] == pytest.approx(-1.0)


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_bad_inputs_name_file_line_and_field(tmp_path):
    good = {"question": "q", "choices": ["x", "y"], "answer": 1}
    path = write(tmp_path / "mc.jsonl", [good, {**good, "answer": 2}])
    with pytest.raises(DataError, match=r"mc\.jsonl:2: field 'answer': answer 2 is not one of the 2 choices"):
        load_multiple_choice(path)
    write(path, [good, {**good, "answer": "C"}])
    with pytest.raises(DataError, match=r"mc\.jsonl:2: field 'answer'"):
        load_multiple_choice(path)
    write(path, [{"question": "q", "options": ["x", "y"], "answer": 0}])
    with pytest.raises(DataError, match=r"mc\.jsonl:1: field 'choices': missing required field"):
        load_multiple_choice(path)
    write(path, [good, "", '{"question": "q",'])
    with pytest.raises(DataError, match=r"mc\.jsonl:3: invalid JSON"):
        load_multiple_choice(path)
    write(path, [{**good, "answer": True}])
    with pytest.raises(DataError, match=r"mc\.jsonl:1: field 'answer'"):
        load_multiple_choice(path)
    write(path, [{"aspect": "rudeness", "prompt": "p"}])
    with pytest.raises(DataError, match=r"mc\.jsonl:1: field 'aspect': expected one of"):
        load_safety_prompts(path)
    write(path, [{"id": "x", "a": "1"}, {"id": "x", "a": "2"}])
    with pytest.raises(DataError, match=r"mc\.jsonl:2: field 'id': duplicate id 'x'"):
        read_records(path, {"a": str}, {"id": str})


def test_letters_normalise_and_mmlu_csv_converts(tmp_path):
    src = tmp_path / "astronomy_test.csv"
    src.write_text('What orbits Earth?,The Moon,Mars,"Venus, the planet",The Sun,A\nBig?,yes,no,maybe,never,D\n')
    items = load_multiple_choice(convert_mmlu(src, tmp_path / "mc.jsonl"))
    assert [i["answer"] for i in items] == [0, 3]
    assert items[0]["choices"][2] == "Venus, the planet" and items[0]["subject"] == "astronomy"
    src.write_text("Q,a,b,E\n")
    with pytest.raises(DataError, match=r"astronomy_test\.csv:1: field 'answer'"):
        convert_mmlu(src, tmp_path / "bad.jsonl")


def test_result_file_resumes_and_drops_a_cut_line(tmp_path):
    store = ResultFile(tmp_path / "r.jsonl")
    store.put_many([(("m", "1"), "one"), (("m", "2"), {"x": 2})])
    with open(tmp_path / "r.jsonl", "a") as f:
        f.write('{"key": ["m", "3"], "val')
    again = ResultFile(tmp_path / "r.jsonl")
    assert len(again) == 2 and again.get(("m", "2")) == {"x": 2} and ("m", "3") not in again
    write(tmp_path / "bad.jsonl", [{"no": "key"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1"):
        ResultFile(tmp_path / "bad.jsonl")
