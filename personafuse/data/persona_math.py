"""PersonaMath-style augmentation: rewrite verified questions as posed by diverse personas.

For each seed problem (question + reference answer), with any :class:`ChatGenerator`:

* stage 1: the generator solves the question step by step; if the answer checker accepts it, the
  question is rewritten ``k1`` times, each as posed by a sampled persona (same mathematics, same
  answer), and a rewrite is kept only if solving it again gives the reference answer;
* stage 2 (reflection): a question solved wrongly is shown its wrong solution and re-solved; if that
  is right, it is rewritten ``k2`` times, and each rewrite is solved, reflected on if wrong, and kept
  only if one of those gives the reference answer. A question wrong twice is dropped.

Output rows (JSONL, appended as each question finishes)::

    {"id": "math-003-s1-r0", "source_id": "math-003", "stage": 1, "persona_id": "p-3f2a...",
     "problem": "...", "response": "...", "answer": "30", "reflected": false}

The original question is written too (``persona_id`` null) unless ``keep_originals=False``. A ledger
beside the output (``<name>.ledger.jsonl``) records every finished question with the fate of each of
its rewrites: the run skips ledger ids when restarted, and the stats report is read from it, so it
covers all runs into the same output.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from personafuse.answers import is_correct, reference_answer
from personafuse.data.generators import ChatGenerator, Conversation
from personafuse.data.personas import Persona, sample_personas
from personafuse.data.schema import SEED_DIR, DataError, load_jsonl
from personafuse.data.synthesize import read_resumable_jsonl

log = logging.getLogger(__name__)

SOLVER_SYSTEM = ("You are a careful math tutor. Solve the problem step by step, then give the final answer "
                 "on the last line as: The answer is \\boxed{<answer>}.")
REWRITE_SYSTEM = "You rewrite math word problems so that they sound like they were written by a given person."


@dataclass(frozen=True)
class MathProblem:
    """A seed problem. ``answer`` is the reference: a bare answer or a GSM8K solution ending ``#### x``."""

    id: str
    question: str
    answer: str

    @property
    def reference(self) -> str:
        return reference_answer(self.answer)


@dataclass
class AugmentStats:
    """What one run did (``processed``/``skipped``/``failed`` questions) and the ledger-wide report."""

    processed: int = 0
    skipped: int = 0
    failed: int = 0
    report: dict[str, Any] = field(default_factory=dict)


def bundled_math_path() -> Path:
    """The 20 project-written GSM8K-format problems shipped with the package."""
    return SEED_DIR / "math.jsonl"


def load_problems(path: str | os.PathLike) -> list[MathProblem]:
    """GSM8K-format JSONL: ``question`` and ``answer`` per line, optional ``id`` (default ``<file stem>-<line>``)."""
    def parse(record: dict, lineno: int) -> MathProblem:
        for key in ("question", "answer"):
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key == "answer":
                value = str(value)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"expected a non-empty string, got {value!r}", field=key)
            record[key] = value
        pid = str(record.get("id", f"{Path(path).stem}-{lineno}"))
        return MathProblem(pid, record["question"].strip(), record["answer"])

    return load_jsonl(path, parse, lambda problem: problem.id)


def solve_prompt(question: str) -> Conversation:
    return [{"role": "system", "content": SOLVER_SYSTEM}, {"role": "user", "content": question}]


def reflection_prompt(question: str, wrong_solution: str) -> Conversation:
    """The wrong attempt as the assistant's turn, then a request to find the mistake and solve again."""
    return [*solve_prompt(question), {"role": "assistant", "content": wrong_solution},
            {"role": "user", "content": "That answer is not correct. Reflect on where the reasoning above went wrong, "
                                        "then solve the problem again from the start, step by step, and end with: "
                                        "The answer is \\boxed{<answer>}."}]


def rewrite_prompt(question: str, persona: Persona) -> Conversation:
    user = (f"Person: {persona.description}\n\nOriginal problem:\n{question}\n\n"
            "Rewrite the problem as this person would pose it, in their own words and drawing on their life and "
            "work. Keep every number, quantity and relationship, so the problem has exactly the same answer. "
            "Do not solve it and do not give the answer. Reply with the rewritten problem only.")
    return [{"role": "system", "content": REWRITE_SYSTEM}, {"role": "user", "content": user}]


def clean_rewrite(text: str) -> str:
    """Drop the preambles and quotes models wrap rewrites in ("Rewritten problem: ...")."""
    text = re.sub(r"^\s*(?:\*\*)?(?:rewritten|new|revised)\s+(?:problem|question)(?:\*\*)?\s*:\s*", "", text,
                  flags=re.IGNORECASE)
    return text.strip().strip('"').strip()


def ledger_path(out_path: str | os.PathLike) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".ledger.jsonl")


def augment_math(
    problems: Iterable[MathProblem],
    personas: Sequence[Persona],
    generator: ChatGenerator,
    out_path: str | os.PathLike,
    *,
    k1: int = 3,
    k2: int = 2,
    seed: int = 0,
    keep_originals: bool = True,
    solve_sampling: Mapping[str, Any] | None = None,
    rewrite_sampling: Mapping[str, Any] | None = None,
    chunk_size: int = 8,
    group_by: str = "occupation",
    progress: bool = True,
) -> AugmentStats:
    """Run both stages over ``problems``, appending to ``out_path`` and resuming from its ledger.

    Generator calls are batched over ``chunk_size`` questions at a time (their rewrites and
    re-solves together). ``solve_sampling``/``rewrite_sampling`` are per-call sampling options
    (e.g. greedy solving, ``temperature 0.8`` rewriting). Personas are drawn per question and stage
    from ``seed``, so a restart draws the same ones. A chunk whose generation fails is logged and
    counted as failed; its questions are retried on the next run.
    """
    if k1 < 0 or k2 < 0:
        raise ValueError(f"k1 and k2 must be >= 0, got {k1}, {k2}")
    if not personas and (k1 or k2):
        raise ValueError("rewriting needs a non-empty persona bank")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ledger = ledger_path(out_path)
    done = {r["id"] for _, r in read_resumable_jsonl(ledger, "ledger")}
    written = {r.get("id") for _, r in read_resumable_jsonl(out_path, "persona SFT")}
    problems = list(problems)
    worker = _Augmenter(personas, generator, k1, k2, seed, dict(solve_sampling or {}), dict(rewrite_sampling or {}))
    stats = AugmentStats()
    todo = [p for p in problems if p.id not in done]
    stats.skipped = len(problems) - len(todo)
    with open(out_path, "a", encoding="utf-8") as out, open(ledger, "a", encoding="utf-8") as book, \
            tqdm(total=len(problems), initial=stats.skipped, disable=not progress,
                 desc=f"persona-augment {out_path.name}") as bar:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            try:
                results = worker.run(chunk)
            except Exception as e:  # a failed chunk must not cost a long run; it is retried on restart
                log.warning("questions %s failed: %s: %s", [p.id for p in chunk], type(e).__name__, e)
                stats.failed += len(chunk)
                bar.update(len(chunk))
                continue
            for problem in chunk:
                rows, entry = results[problem.id]
                rows = [r for r in rows if keep_originals or r["persona_id"] is not None]
                # Rows of a question whose ledger line was lost to a kill are already there: not twice.
                out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows if r["id"] not in written))
                out.flush()
                book.write(json.dumps(entry, ensure_ascii=False) + "\n")
                book.flush()
                stats.processed += 1
            bar.update(len(chunk))
    stats.report = augmentation_report(ledger, personas, group_by)
    return stats


class _Augmenter:
    """The two stages over a chunk of questions, each step one batched generator call."""

    def __init__(self, personas, generator, k1, k2, seed, solve_sampling, rewrite_sampling):
        self.personas, self.generator, self.k1, self.k2, self.seed = personas, generator, k1, k2, seed
        self.solve_sampling, self.rewrite_sampling = solve_sampling, rewrite_sampling

    def run(self, chunk: list[MathProblem]) -> dict[str, tuple[list[dict], dict]]:
        rows: dict[str, list[dict]] = {p.id: [] for p in chunk}
        entries = {p.id: {"id": p.id, "outcome": "unsolved", "rewrites": []} for p in chunk}

        first = self._solve([p.question for p in chunk])
        solved1, wrong = [], []
        for p, s in zip(chunk, first, strict=True):
            if is_correct(s, p.reference):
                solved1.append(p)
                entries[p.id]["outcome"] = "stage1"
                rows[p.id].append(_row(p, 1, "orig", None, p.question, s, reflected=False))
            else:
                wrong.append((p, s))

        reflected = self._reflect([(p.question, s) for p, s in wrong])
        solved2 = []
        for (p, _), s in zip(wrong, reflected, strict=True):
            if is_correct(s, p.reference):
                solved2.append(p)
                entries[p.id]["outcome"] = "stage2"
                rows[p.id].append(_row(p, 2, "orig", None, p.question, s, reflected=True))

        jobs = [(p, 1, j, persona) for p in solved1
                for j, persona in enumerate(self._personas(p, 1, self.k1))]
        jobs += [(p, 2, j, persona) for p in solved2
                 for j, persona in enumerate(self._personas(p, 2, self.k2))]
        texts = self.generator.generate([rewrite_prompt(p.question, persona) for p, _, _, persona in jobs],
                                        **self.rewrite_sampling)
        texts = [clean_rewrite(t) for t in texts]
        usable = [i for i, t in enumerate(texts) if t and _key(t) != _key(jobs[i][0].question)]
        solutions = dict(zip(usable, self._solve([texts[i] for i in usable]), strict=True))
        retry = [i for i in usable if jobs[i][1] == 2 and not is_correct(solutions[i], jobs[i][0].reference)]
        second = dict(zip(retry, self._reflect([(texts[i], solutions[i]) for i in retry]), strict=True))

        for i, (p, stage, j, persona) in enumerate(jobs):
            event = {"stage": stage, "persona_id": persona.id}
            if i not in solutions:
                event["result"] = "bad_rewrite"
            elif is_correct(solutions[i], p.reference):
                event["result"] = "kept"
                rows[p.id].append(_row(p, stage, f"r{j}", persona, texts[i], solutions[i], reflected=False))
            elif i in second and is_correct(second[i], p.reference):
                event["result"] = "kept_after_reflection"
                rows[p.id].append(_row(p, stage, f"r{j}", persona, texts[i], second[i], reflected=True))
            else:
                event["result"] = "answer_changed"
            entries[p.id]["rewrites"].append(event)
        return {p.id: (rows[p.id], entries[p.id]) for p in chunk}

    def _solve(self, questions: list[str]) -> list[str]:
        if not questions:
            return []
        return self.generator.generate([solve_prompt(q) for q in questions], **self.solve_sampling)

    def _reflect(self, attempts: list[tuple[str, str]]) -> list[str]:
        if not attempts:
            return []
        return self.generator.generate([reflection_prompt(q, s) for q, s in attempts], **self.solve_sampling)

    def _personas(self, problem: MathProblem, stage: int, k: int) -> list[Persona]:
        return sample_personas(self.personas, min(k, len(self.personas)), f"{self.seed}/{problem.id}/{stage}")


def _row(problem: MathProblem, stage: int, tag: str, persona: Persona | None, question: str, response: str,
         reflected: bool) -> dict[str, Any]:
    return {"id": f"{problem.id}-s{stage}-{tag}", "source_id": problem.id, "stage": stage,
            "persona_id": persona.id if persona else None, "problem": question, "response": response,
            "answer": problem.reference, "reflected": reflected}


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def augmentation_report(ledger: str | os.PathLike, personas: Sequence[Persona] = (),
                        group_by: str = "occupation") -> dict[str, Any]:
    """Kept/rejected counts per stage and per persona group, over every question in the ledger."""
    group_of = {p.id: p.group(group_by) for p in personas}
    questions = Counter()
    stages: dict[str, Counter] = defaultdict(Counter)
    groups: dict[str, Counter] = defaultdict(Counter)
    for _, entry in read_resumable_jsonl(ledger, "ledger"):
        questions[entry["outcome"]] += 1
        for event in entry["rewrites"]:
            kept = event["result"].startswith("kept")
            stages[f"stage{event['stage']}"][event["result"]] += 1
            groups[group_of.get(event["persona_id"], "unknown")]["kept" if kept else "rejected"] += 1
    return {
        "questions": {"total": sum(questions.values()), "solved_stage1": questions["stage1"],
                      "solved_after_reflection": questions["stage2"], "unsolved": questions["unsolved"]},
        "rewrites": {stage: {"kept": c["kept"] + c["kept_after_reflection"],
                             "rejected": c["answer_changed"] + c["bad_rewrite"], **dict(sorted(c.items()))}
                     for stage, c in sorted(stages.items())},
        "groups": {"by": group_by, **{g: {"kept": c["kept"], "rejected": c["rejected"]}
                                      for g, c in sorted(groups.items())}},
    }


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a few aligned lines for the console."""
    q = report["questions"]
    lines = [f"questions: {q['total']} | solved at stage 1: {q['solved_stage1']} | after reflection: "
             f"{q['solved_after_reflection']} | unsolved: {q['unsolved']}"]
    for stage, counts in report["rewrites"].items():
        detail = ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("kept", "rejected"))
        lines.append(f"{stage} rewrites: kept {counts['kept']}, rejected {counts['rejected']} ({detail})")
    groups = {g: c for g, c in report["groups"].items() if g != "by"}
    if groups:
        width = max(len(g) for g in groups)
        lines.append(f"rewrites by persona {report['groups']['by']}:")
        lines += [f"  {g:<{width}}  kept {c['kept']:>4}  rejected {c['rejected']:>4}" for g, c in groups.items()]
    return "\n".join(lines)


def math_sft_rows(path: str | os.PathLike) -> list[dict]:
    """TRL prompt-completion rows from an augmentation output: the solver prompt, then the verified solution.

    The prompt is the one evaluation uses (:func:`solve_prompt`), so training and testing see the same format.
    """
    rows = []
    for lineno, record in read_resumable_jsonl(path, "persona SFT"):
        if not isinstance(record.get("problem"), str) or not isinstance(record.get("response"), str):
            raise DataError("expected 'problem' and 'response' strings (an augment_math output row)",
                            path=path, line=lineno, field="problem")
        rows.append({"prompt": solve_prompt(record["problem"]),
                     "completion": [{"role": "assistant", "content": record["response"]}]})
    return rows
