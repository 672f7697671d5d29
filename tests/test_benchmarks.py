"""Readers for the published persona benchmarks (project-written fixtures in the authors' shapes) and their
suites end to end through an OpenAI-compatible judge server."""

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from personafuse import PersonaFuseConfig, PersonaFuseModel
from personafuse.data.schema import DataError
from personafuse.eval import GenerationSettings, ResultFile, run_evaluation, standard_candidates
from personafuse.eval.benchmarks import (
    NO_SCORE_EXAMPLES,
    evaluate_personagym,
    load_persona_list,
    load_personaeval,
    load_personafeedback,
    load_personagym,
    load_personagym_rubrics,
    parse_final_score,
    parse_probabilities,
)
from tests.eval_tiny import ScriptedJudge
from tests.openai_fixture_server import FakeOpenAIServer
from tests.test_model import CFG
from tests.tiny import make_tiny_llama, make_tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
GYM = FIXTURES / "personagym" / "questions" / "benchmark-v1"
GYM_PERSONAS = FIXTURES / "personagym" / "code" / "personas.py"
GYM_RUBRICS = FIXTURES / "personagym" / "rubrics"
KEEPER = "A 45-year-old lighthouse keeper from Maine who restores old radios"
STUDENT = "A 23-year-old marine biology student from Lisbon who competes in sailing races"


def test_personagym_reads_every_persona_file_with_the_five_tasks():
    items = load_personagym(GYM)
    assert len(items) == 12 and {i["persona"] for i in items} == {KEEPER, STUDENT}
    keeper = [i for i in items if i["persona"] == KEEPER]
    assert [i["task"] for i in keeper] == ["expected_action", "expected_action", "toxicity_control",
                                           "linguistic_habits", "persona_consistency", "action_justification"]
    assert keeper[1]["question"].startswith("A neighbour brings you") and keeper[1]["id"] == f"{KEEPER}/expected_action/1"


def test_personagym_persona_list_from_the_authors_python_file_is_read_not_run(tmp_path):
    assert load_persona_list(GYM_PERSONAS) == [KEEPER, STUDENT]
    (tmp_path / "one.txt").write_text(f"{STUDENT}\n\n")
    assert {i["persona"] for i in load_personagym(GYM, tmp_path / "one.txt")} == {STUDENT}
    evil = tmp_path / "personas.py"
    evil.write_text("import os\nbenchmark_personas = [os.getcwd()]\n")
    with pytest.raises(DataError, match="other than string literals"):
        load_persona_list(evil)
    (tmp_path / "missing.json").write_text(json.dumps([STUDENT, "A chess-playing astronaut"]))
    with pytest.raises(DataError, match=r"persona 'A chess-playing astronaut' .* expected A chess-playing astronaut\.json"):
        load_personagym(GYM, tmp_path / "missing.json")


@pytest.mark.parametrize("edit, message", [
    (lambda q: q.pop("Toxicity"), r"field 'Toxicity': missing task"),
    (lambda q: q.update({"Humour": ["Tell a joke."]}), r"field 'Humour': unknown task"),
    (lambda q: q["Expected Action"].append("  "), r"field 'Expected Action\[2\]': expected a non-empty question"),
    (lambda q: q.update({"Linguistic Habits": "Describe your day."}), r"field 'Linguistic Habits': expected a non-empty list"),
])
def test_personagym_errors_name_file_and_task(tmp_path, edit, message):
    shutil.copytree(GYM, tmp_path / "q")
    file = tmp_path / "q" / f"{KEEPER}.json"
    questions = json.loads(file.read_text())
    edit(questions)
    file.write_text(json.dumps(questions, indent=4))
    with pytest.raises(DataError, match=re.escape(str(file)) + ": " + message):
        load_personagym(tmp_path / "q")


def test_personagym_bad_json_and_missing_folder(tmp_path):
    (tmp_path / "X.json").write_text('{\n  "Expected Action": [\n    "a",\n  ]\n}')
    with pytest.raises(DataError, match=r"X\.json:4: invalid JSON"):
        load_personagym(tmp_path)
    with pytest.raises(DataError, match="not a directory; expected PersonaGym's questions folder"):
        load_personagym(tmp_path / "nowhere")


@pytest.mark.parametrize("reply, expected", [
    ("A score of 2 would fit a rude reply; this one is kind. Therefore, the final score is 4.", 4.0),
    ("Therefore, the final score is **5**", 5.0), ("the final score is 3. No wait, the final score is 2", 2.0),
    ("Therefore, the final score is 7.", None), ("Score: 3", 3.0), ("It is fine.", None),
])
def test_parse_final_score(reply, expected):
    assert parse_final_score(reply) == expected


def test_personagym_with_the_authors_rubric_templates(tmp_path):
    rubrics = load_personagym_rubrics(GYM_RUBRICS)
    assert set(rubrics) == {"expected_action", "toxicity_control", "linguistic_habits", "persona_consistency",
                            "action_justification"}
    tok = make_tiny_tokenizer()
    pf = PersonaFuseModel.from_base(make_tiny_llama(tok), PersonaFuseConfig(**CFG), tokenizer=tok).eval()
    items = load_personagym(GYM, GYM_PERSONAS)
    judge = ScriptedJudge(lambda c: "Reasoned. Therefore, the final score is " +
                          ("1." if "Toxicity" in c[1]["content"] else "5."))
    out = evaluate_personagym(standard_candidates(pf, tok, ["base"]), items, {"j": judge},
                              ResultFile(tmp_path / "gym.jsonl"), GenerationSettings(max_new_tokens=2), False, rubrics)
    base = out["candidates"]["base"]
    assert base["tasks"]["toxicity_control"] == 1.0 and base["tasks"]["expected_action"] == 5.0
    assert base["persona_score"] == pytest.approx((4 * 5 + 1) / 5) and out["judges"]["j"]["malformed"] == 0
    asked = judge.asked[0][1]["content"]
    assert f"Persona: {KEEPER}" in asked and "Question: A storm knocks out" in asked
    assert f"Response: {base['replies'][0]}" in asked and NO_SCORE_EXAMPLES in asked and "{" not in asked


def test_personagym_rubric_errors(tmp_path):
    shutil.copytree(GYM_RUBRICS, tmp_path / "r")
    (tmp_path / "r" / "Toxicity.txt").write_text("Rate {persona} answering {question}.")
    with pytest.raises(DataError, match=r"Toxicity\.txt: rubric template lacks the \{response\} slot"):
        load_personagym_rubrics(tmp_path / "r")
    (tmp_path / "r" / "Toxicity.txt").unlink()
    with pytest.raises(DataError, match=r"no rubric for task 'Toxicity'; expected Toxicity\.txt"):
        load_personagym_rubrics(tmp_path / "r")


def test_personaeval_reads_tracks_candidates_profiles_and_the_answer():
    items = load_personaeval(FIXTURES / "personaeval")
    assert [(i["id"], i["answer"], len(i["candidates"])) for i in items] == [
        ("Expertise-1", 0, 5), ("Literary-1", 0, 4), ("Literary-2", 1, 4)]
    assert items[2]["candidates"][1] == "Doctor Marsh" and items[2]["profiles"][1].startswith("The ship's physician")
    assert "rope is jammed" in items[1]["prompt"] and items[0]["track"] == "Expertise"


def _edit_csv(src: Path, dst: Path, row: int, **changes) -> Path:
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[row].update(changes)
    with open(dst, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dst


def test_personaeval_errors_name_file_line_and_column(tmp_path):
    src = FIXTURES / "personaeval" / "Literary.csv"
    # the first row's prompt spans three lines, so the second row starts on line 5
    bad = _edit_csv(src, tmp_path / "Literary.csv", 1, gt="Captain Nemo")
    with pytest.raises(DataError, match=r"Literary\.csv:5: field 'gt': ground truth 'Captain Nemo' is none of"):
        load_personaeval(bad)
    bad = _edit_csv(src, tmp_path / "Drama.csv", 0, option3="Sailor Finn")
    with pytest.raises(DataError, match=r"Drama\.csv:2: field 'option3': duplicate candidate 'Sailor Finn'"):
        load_personaeval(bad)
    bad = _edit_csv(src, tmp_path / "Empty.csv", 0, option2="")
    with pytest.raises(DataError, match=r"Empty\.csv:2: field 'option2': expected a non-empty value"):
        load_personaeval(bad)
    header = src.read_text().splitlines()[0]
    (tmp_path / "NoProfiles.csv").write_text(header.replace(",option4_profile", "") + "\n")
    with pytest.raises(DataError, match=r"NoProfiles\.csv:1: field 'option4_profile': missing column"):
        load_personaeval(tmp_path / "NoProfiles.csv")


@pytest.mark.parametrize("reply, expected", [
    ('```json\n{"Ann": 0.2, "bob": 0.6, "Cy": 0.2}\n```', [0.2, 0.6, 0.2]),
    ('{"Ann": 2, "Bob": 1, "Cy": 1}', [0.5, 0.25, 0.25]),
    ("It is Cy, clearly.", [0.0, 0.0, 1.0]),
    ('{"Ann": 0.5, "Bob": 0.5}', None), ("Ann or Bob", None), ('{"Ann": -1, "Bob": 1, "Cy": 1}', None),
])
def test_parse_probabilities(reply, expected):
    got = parse_probabilities(reply, ["Ann", "Bob", "Cy"])
    assert got == (None if expected is None else pytest.approx(expected))


def test_personafeedback_groups_and_balanced_positions():
    items = load_personafeedback(FIXTURES / "personafeedback")
    assert [(i["id"], i["gold"]) for i in items] == [("general/hard-1", "b"), ("specific/easy-1", "b"),
                                                     ("specific/easy-2", "a")]
    assert items[1]["response_b"].startswith("Something quick and light") and items[1]["query"].endswith("at 7am?")
    assert items[0]["persona"] == "occupation: high-school chemistry teacher\npersonality: patient, loves analogies"


def test_personafeedback_labelled_pairs_with_renamed_fields_and_errors(tmp_path):
    file = tmp_path / "pairs.jsonl"
    row = {"profile": "a beekeeper", "prompt": "Any weekend plans?", "response_a": "Check the hives.",
           "response_b": "Go clubbing.", "label": 1}
    file.write_text(json.dumps(row) + "\n" + json.dumps({**row, "label": "B"}) + "\n")
    items = load_personafeedback(file, {"persona": "profile", "query": "prompt"})
    assert [(i["group"], i["persona"], i["gold"]) for i in items] == [("pairs", "a beekeeper", "a"),
                                                                      ("pairs", "a beekeeper", "b")]
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: field 'question': missing \(the query field; rename with "
                                        r"fields\.query=<key>\)"):
        load_personafeedback(file, {"persona": "profile"})
    file.write_text(json.dumps({**row, "label": 3}) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: field 'label': expected A/B or 1/2, got 3"):
        load_personafeedback(file, {"persona": "profile", "query": "prompt"})
    with pytest.raises(ValueError, match=r"unknown PersonaFeedback field role\(s\) \['answer'\]"):
        load_personafeedback(file, {"answer": "label"})


def scripted_judge(messages):
    """A judge that rates lighthouse-keeper replies 2 and others 4, identifies speakers from cues in the
    dialogue, and always prefers response A."""
    text = messages[-1]["content"]
    if "Rate from 1" in text:
        return "Score: 2" if "lighthouse keeper" in text else "Score: 4"
    if text.startswith("Grade one response"):  # the rubric templates of tests/fixtures/.../rubrics
        return f"Therefore, the final score is {2 if 'lighthouse keeper' in text else 4}."
    if "Candidate characters" in text:
        if "rope is jammed" in text:
            return '```json\n{"Sailor Finn": 0.7, "Cook Tibbs": 0.1, "Doctor Marsh": 0.1, "Lady Ashby": 0.1}\n```'
        if "I feel faint" in text:  # wrong: the doctor ranks second
            return '{"Cook Tibbs": 0.5, "Doctor Marsh": 0.3, "Sailor Finn": 0.1, "Captain Rowe": 0.1}'
        return "The speaker is the Child."
    return "Answer: A"


def test_benchmark_suites_end_to_end_with_an_openai_judge(tmp_path):
    tok = make_tiny_tokenizer()
    pf = PersonaFuseModel.from_base(make_tiny_llama(tok), PersonaFuseConfig(**CFG), tokenizer=tok).eval()
    data = {"personagym": str(GYM), "personagym_personas": str(GYM_PERSONAS),
            "personaeval": str(FIXTURES / "personaeval"), "personafeedback": str(FIXTURES / "personafeedback")}
    with FakeOpenAIServer(answer=scripted_judge) as server:
        judges = {"fixture": {"backend": "openai", "base_url": server.base_url, "model": "judge", "max_retries": 0}}
        results = run_evaluation(pf, tok, tmp_path, suites=["personagym", "personaeval", "personafeedback"],
                                 candidates=["base"], settings=GenerationSettings(max_new_tokens=2, batch_size=4),
                                 data=data, judges=judges, progress=False)
        assert len(server.requests) == 12 + 3 + 3  # ratings, speaker guesses, pair choices
    # a rerun asks neither the candidates nor the (now unreachable) judge again
    assert run_evaluation(pf, tok, tmp_path, suites=["personagym", "personaeval", "personafeedback"],
                          candidates=["base"], settings=GenerationSettings(max_new_tokens=2, batch_size=4),
                          data=data, judges=judges, progress=False) == results
    gym = results["personagym"]["candidates"]["base"]
    assert gym["personas"] == {KEEPER: 2.0, STUDENT: 4.0} and gym["persona_score"] == 3.0
    assert gym["tasks"]["action_justification"] == pytest.approx((2 + 4 + 4) / 3)
    assert len((tmp_path / "cache" / "personagym.jsonl").read_text().splitlines()) == 12

    pe = results["personaeval"]["fixture"]
    assert pe["accuracy"] == pytest.approx(2 / 3) and pe["top2_accuracy"] == 1.0 and pe["mean_rank"] == pytest.approx(4 / 3)
    assert pe["chance"] == pytest.approx((1 / 5 + 1 / 4 + 1 / 4) / 3) and pe["trusted"] is False
    assert pe["tracks"]["Literary"]["accuracy"] == 0.5 and pe["tracks"]["Expertise"]["accuracy"] == 1.0

    pfb = results["personafeedback"]
    assert pfb["overall"]["fixture"] == {"kind": "judge", "n": 3, "accuracy": pytest.approx(1 / 3), "malformed": 0}
    assert pfb["groups"]["specific/easy"]["fixture"]["accuracy"] == 0.5

    assert json.loads((tmp_path / "results.json").read_text()).keys() == results.keys()
    report = (tmp_path / "report.md").read_text()
    assert "## personagym" in report and "## personaeval" in report and "| fixture / specific/easy |" in report
    assert (tmp_path / "personagym.png").stat().st_size > 0


def test_benchmark_suites_need_the_downloaded_files(tmp_path):
    with pytest.raises(ValueError, match=r"suite personaeval reads the published files you downloaded: set "
                                         r"data\.personaeval=<path to a PersonaEval CSV"):
        run_evaluation(None, None, tmp_path, suites=["personaeval"])



def compose_evaluate(overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="evaluate", overrides=overrides), resolve=True)


def test_evaluate_config_takes_the_benchmark_paths_and_field_renames():
    assert compose_evaluate([])["personafeedback_fields"] is None
    cfg = compose_evaluate(["suites=[personagym,personaeval,personafeedback]", f"data.personagym={GYM}",
                            f"data.personagym_personas={GYM_PERSONAS}", "data.personaeval=PersonaEval/data",
                            "data.personafeedback=PersonaFeedback/data", "personafeedback_fields={query: prompt}"])
    assert cfg["data"]["personagym"] == str(GYM) and cfg["data"]["personaeval"] == "PersonaEval/data"
    assert cfg["personafeedback_fields"] == {"query": "prompt"}


def test_personafuse_evaluate_runs_the_benchmarks_from_hydra_overrides(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from personafuse.base_models import load_base_model
    from personafuse.cli import main

    monkeypatch.delenv("PERSONAFUSE_DEBUG", raising=False)
    model, tok = load_base_model(tiny_model_dir)
    PersonaFuseModel.from_base(model, PersonaFuseConfig(**CFG), tokenizer=tok).save_pretrained(tmp_path / "bundle")
    common = [f"model.path={tiny_model_dir}", f"run_dir={tmp_path}", f"bundle_dir={tmp_path / 'bundle'}",
              "candidates=[base]", "generation.max_new_tokens=2"]
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", *common, "suites=[personafeedback]"])
    assert exit_.value.code == 2
    assert "set data.personafeedback=<path to a PersonaFeedback .jsonl" in capsys.readouterr().err
    with FakeOpenAIServer(answer=scripted_judge) as server:
        assert main(["evaluate", *common, "suites=[personagym,personaeval,personafeedback]",
                     f"data.personagym={GYM}", f"data.personagym_personas={GYM_PERSONAS}",
                     f"data.personagym_rubrics={GYM_RUBRICS}",
                     f"data.personaeval={FIXTURES / 'personaeval'}", f"data.personafeedback={FIXTURES / 'personafeedback'}",
                     f"+judges.fixture={{backend: openai, base_url: '{server.base_url}', model: judge, max_retries: 0}}"]) == 0
        graded = [r for r in server.requests if r["messages"][-1]["content"].startswith("Grade one response")]
        assert len(graded) == 12 and all(r["max_tokens"] == 512 for r in graded)
    results = json.loads((tmp_path / "evaluate" / "results.json").read_text())
    assert results["personagym"]["candidates"]["base"]["personas"] == {KEEPER: 2.0, STUDENT: 4.0}
    assert results["personaeval"]["fixture"]["accuracy"] == pytest.approx(2 / 3)
    assert results["personafeedback"]["overall"]["fixture"]["accuracy"] == pytest.approx(1 / 3)
