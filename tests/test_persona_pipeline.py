"""The persona augmentation pipeline against a scripted teacher: every branch of the two stages,
resume after a kill, the recipe over the local OpenAI-compatible fixture server, and dialogue voices."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from personafuse.data import load_situations
from personafuse.data.persona_dialogue import diversify_situations
from personafuse.data.persona_math import (
    REWRITE_SYSTEM,
    MathProblem,
    augment_math,
    augmentation_report,
    ledger_path,
    load_problems,
    math_sft_rows,
)
from personafuse.data.personas import build_persona_bank
from personafuse.data.schema import bundled_seed_paths
from personafuse.workflows.persona_sft_data import run_data
from tests.openai_fixture_server import FakeOpenAIServer, canned_answer

REPO = Path(__file__).resolve().parents[1]

# The tag in each question tells the teacher how to behave.
PROBLEMS = [
    MathProblem("easy", "(easy) Ann has 2 apples and buys 3 more. What is 2 + 3?", "She has 5.\n#### 5"),
    MathProblem("reflect", "(reflect) What is 10 - 4?", "6"),
    MathProblem("hard", "(hard) What is 9 * 9?", "81"),
    MathProblem("drift", "(drift) What is 12 / 4?", "3"),
    MathProblem("empty", "(empty) What is 7 + 7?", "14"),
]
PERSONAS = build_persona_bank(12, seed=0)


def teacher(messages: list[dict[str, str]]) -> str:
    """Rewrites keep the question (drift changes a number, empty returns nothing); solutions are right,
    except (reflect) before reflection and (hard) always."""
    if messages[0]["content"] == REWRITE_SYSTEM:
        user = messages[1]["content"]
        question = user.split("Original problem:\n")[1].split("\n\n")[0]
        job = re.search(r"works as an? (.+?) and has", user).group(1)
        if "(empty)" in question:
            return '""'
        if "(drift)" in question:
            question = question.replace("12", "18")
        return f'Rewritten problem: "As a {job}, I wonder: {question}"'
    question = messages[1]["content"]
    reflecting = len(messages) == 4
    a, op, b = re.search(r"(\d+) ([-+*/]) (\d+)\?", question).groups()
    value = eval(f"{a} {op} {b}")
    value = int(value) if value == int(value) else value
    if "(hard)" in question or ("(reflect)" in question and not reflecting):
        value += 1
    return f"We compute {a} {op} {b} = {value}.\nThe answer is \\boxed{{{value}}}."


class Teacher:
    """In-process teacher; ``interrupt_after`` calls it raises KeyboardInterrupt (a kill)."""

    def __init__(self, interrupt_after: int | None = None):
        self.calls, self.interrupt_after = 0, interrupt_after

    def generate(self, conversations, **sampling):
        if self.interrupt_after is not None and self.calls >= self.interrupt_after:
            raise KeyboardInterrupt
        self.calls += 1
        return [teacher(c) for c in conversations]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


EXPECTED_REPORT = {
    "questions": {"total": 5, "solved_stage1": 3, "solved_after_reflection": 1, "unsolved": 1},
    "rewrites": {"stage1": {"kept": 2, "rejected": 4, "answer_changed": 2, "bad_rewrite": 2},
                 "stage2": {"kept": 2, "rejected": 0, "kept_after_reflection": 2}},
}


def test_every_branch_of_both_stages(tmp_path):
    out = tmp_path / "math.jsonl"
    stats = augment_math(PROBLEMS, PERSONAS, Teacher(), out, k1=2, k2=2, chunk_size=5, progress=False)
    assert (stats.processed, stats.skipped, stats.failed) == (5, 0, 0)
    assert {k: stats.report[k] for k in ("questions", "rewrites")} == EXPECTED_REPORT
    groups = {g: c for g, c in stats.report["groups"].items() if g != "by"}
    assert sum(c["kept"] for c in groups.values()) == 4 and sum(c["rejected"] for c in groups.values()) == 4

    rows = {r["id"]: r for r in read_rows(out)}
    assert sorted(rows) == ["drift-s1-orig", "easy-s1-orig", "easy-s1-r0", "easy-s1-r1", "empty-s1-orig",
                            "reflect-s2-orig", "reflect-s2-r0", "reflect-s2-r1"]
    assert rows["easy-s1-orig"]["persona_id"] is None and rows["easy-s1-orig"]["answer"] == "5"
    rewrite = rows["easy-s1-r0"]
    assert rewrite["persona_id"] in {p.id for p in PERSONAS} and rewrite["stage"] == 1
    assert rewrite["problem"].startswith("As a ") and "2 + 3" in rewrite["problem"]  # preamble and quotes gone
    assert rows["reflect-s2-orig"]["reflected"] and rows["reflect-s2-r1"]["reflected"]
    assert rows["reflect-s2-r0"]["response"].endswith("\\boxed{6}.")
    assert not any(r["source_id"] == "hard" for r in rows.values())

    sft = math_sft_rows(out)
    assert len(sft) == 8 and sft[0]["prompt"][0]["role"] == "system"
    assert sft[0]["completion"] == [{"role": "assistant", "content": read_rows(out)[0]["response"]}]


def test_personas_are_drawn_per_question_and_stage_from_the_seed(tmp_path):
    first = augment_math(PROBLEMS[:1], PERSONAS, Teacher(), tmp_path / "a.jsonl", k1=3, progress=False)
    again = augment_math(PROBLEMS[:1], PERSONAS, Teacher(), tmp_path / "b.jsonl", k1=3, chunk_size=1, progress=False)
    other = augment_math(PROBLEMS[:1], PERSONAS, Teacher(), tmp_path / "c.jsonl", k1=3, seed=1, progress=False)
    ids = [[r["persona_id"] for r in read_rows(tmp_path / f"{n}.jsonl")] for n in "abc"]
    assert ids[0] == ids[1] != ids[2] and len(set(ids[0][1:])) == 3
    assert first.report == again.report and other.processed == 1


def test_resume_after_a_kill_finishes_without_duplicates(tmp_path):
    reference = tmp_path / "reference.jsonl"
    augment_math(PROBLEMS, PERSONAS, Teacher(), reference, k1=2, k2=2, chunk_size=1, progress=False)

    out = tmp_path / "math.jsonl"
    # Question "easy" takes 3 calls (solve, rewrite, re-solve); the kill lands inside "reflect".
    with pytest.raises(KeyboardInterrupt):
        augment_math(PROBLEMS, PERSONAS, Teacher(interrupt_after=4), out, k1=2, k2=2, chunk_size=1, progress=False)
    assert [json.loads(line)["id"] for line in ledger_path(out).read_text().splitlines()] == ["easy"]
    with open(out, "a") as f:
        f.write('{"id": "reflect-s2-orig", "sour')  # a row cut off by the kill
    resumed = augment_math(PROBLEMS, PERSONAS, Teacher(), out, k1=2, k2=2, chunk_size=1, progress=False)
    assert (resumed.processed, resumed.skipped) == (4, 1)
    assert out.read_text() == reference.read_text()

    # Killed after a question's rows but before its ledger line: redone, its rows not written twice.
    ledger = ledger_path(out)
    ledger.write_text("".join(ledger.read_text().splitlines(keepends=True)[:-1]))
    again = augment_math(PROBLEMS, PERSONAS, Teacher(), out, k1=2, k2=2, chunk_size=1, progress=False)
    assert (again.processed, again.skipped) == (1, 4)
    assert out.read_text() == reference.read_text()
    assert augmentation_report(ledger, PERSONAS)["questions"] == EXPECTED_REPORT["questions"]


def test_a_failing_chunk_is_counted_and_retried_next_run(tmp_path):
    class Flaky(Teacher):
        def generate(self, conversations, **sampling):
            if any("(hard)" in c[-1]["content"] for c in conversations):
                raise RuntimeError("server went away")
            return super().generate(conversations, **sampling)

    out = tmp_path / "math.jsonl"
    stats = augment_math(PROBLEMS, PERSONAS, Flaky(), out, k1=1, k2=1, chunk_size=1, progress=False)
    assert (stats.processed, stats.failed) == (4, 1)
    retry = augment_math(PROBLEMS, PERSONAS, Teacher(), out, k1=1, k2=1, chunk_size=1, progress=False)
    assert (retry.processed, retry.skipped, retry.report["questions"]["unsolved"]) == (1, 4, 1)


def compose_data_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="persona_sft_data", overrides=overrides)


def test_recipe_end_to_end_over_http(tmp_path, capsys):
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + "\n"
                            for p in PROBLEMS))
    assert load_problems(data) == PROBLEMS
    with FakeOpenAIServer(answer=teacher) as server:
        cfg = compose_data_cfg([f"run_dir={tmp_path / 'run'}", f"input={data}", "generator=openai",
                                f"generator.base_url={server.base_url}", "generator.model=teacher",
                                "generator.timeout=5", "personas.count=12", "math.k1=2", "math.k2=2",
                                "personas.group_by=mbti", "progress=false"])
        stats = run_data(cfg)
        assert all(r["temperature"] == 0.0 for r in server.requests if r["messages"][0]["content"] != REWRITE_SYSTEM)
        assert any(r["temperature"] == 0.8 for r in server.requests)
    assert {k: stats[k] for k in ("questions", "rewrites")} == EXPECTED_REPORT
    assert stats["groups"]["by"] == "mbti"
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "stats.json").read_text()) == stats
    assert len(read_rows(run_dir / "math.jsonl")) == 8
    assert len((run_dir / "personas.jsonl").read_text().splitlines()) == 12
    out = capsys.readouterr().out
    assert "solved at stage 1: 3" in out and "rewrites by persona mbti:" in out


def test_dialogue_voices_keep_labels_and_resume(tmp_path):
    def voice(messages):
        user = messages[-1]["content"]
        who = re.search(r"Person: A (\d+-year-old .+?) from", user).group(1)
        message = user.split("Message:\n")[1].split("\n\n")[0]
        return f'"Speaking as a {who}: {message}"'

    class Voice(Teacher):
        def generate(self, conversations, **sampling):
            self.calls += 1
            return [voice(c) for c in conversations]

    train, _ = bundled_seed_paths()
    situations = load_situations(train)[:3]
    out = tmp_path / "voices.jsonl"
    stats = diversify_situations(situations[:2], PERSONAS, Voice(), out, k=2, progress=False)
    assert (stats.written, stats.failed) == (4, 0)
    stats = diversify_situations(situations, PERSONAS, Voice(), out, k=2, progress=False)
    assert (stats.written, stats.skipped) == (2, 4)
    variants = load_situations(out)
    assert len(variants) == 6
    by_id = {s.id: s for s in situations}
    for v in variants:
        source = by_id[v.id.split("~")[0]]
        assert v.id.split("~")[1] in {p.id for p in PERSONAS}
        assert (v.activations, v.gates, v.responses, v.domain) == (source.activations, source.gates,
                                                                    source.responses, source.domain)
        assert v.situation[-1]["content"].startswith("Speaking as a ")
        assert source.situation[-1]["content"] in v.situation[-1]["content"]


def test_dialogue_voices_can_regenerate_the_replies(tmp_path):
    class Canned(Teacher):
        def generate(self, conversations, **sampling):
            return [canned_answer(c) for c in conversations]

    train, _ = bundled_seed_paths()
    source = load_situations(train)[0]
    out = tmp_path / "voices.jsonl"
    stats = diversify_situations([source], PERSONAS, Canned(), out, k=2, responses="regenerate", progress=False)
    assert stats.written == 2
    for v in load_situations(out):
        assert v.activations == source.activations and v.responses != source.responses
        assert v.responses["openness_high"].startswith("[You are a person who is strongly high in openness")


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").environ.get("PERSONAFUSE_REAL_MODEL"),
                    reason="minutes on CPU: set PERSONAFUSE_REAL_MODEL=1 to run the embedded SmolLM2-135M")
def test_real_short_run_with_the_embedded_model(tmp_path):
    cfg = compose_data_cfg([f"run_dir={tmp_path}", "limit=5", "personas.count=50", "math.k1=2", "math.k2=2",
                            "math.chunk_size=5", "math.solve.max_new_tokens=256", "math.rewrite.max_new_tokens=160",
                            "progress=false"])
    stats = run_data(cfg)
    assert stats["questions"]["total"] == 5 and stats["run"]["failed"] == 0
    rows = read_rows(tmp_path / "math.jsonl")
    assert len(rows) == sum(s["kept"] for s in stats["rewrites"].values()) + \
        stats["questions"]["solved_stage1"] + stats["questions"]["solved_after_reflection"]
