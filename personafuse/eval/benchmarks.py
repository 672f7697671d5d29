"""The seed persona benchmarks, read from the files their authors publish; the user downloads them.

* PersonaGym (https://github.com/vsamuel2003/PersonaGym): ``questions/benchmark-v1/<persona>.json``, one file per
  persona, an object with the five task keys of :data:`PERSONAGYM_TASKS`, each a list of questions. The persona
  list is ``code/personas.py`` (``benchmark_personas``, read with :mod:`ast`, never executed), a JSON list or a
  text file with one persona a line. Candidates answer in character and judges rate each reply 1-5 (suite
  ``personagym``; scored as :func:`~personafuse.eval.adherence.evaluate_persona_adherence` does, with the
  authors' ``rubrics/<Task>.txt`` templates when given).
* PersonaEval (https://github.com/maple-zhou/PersonaEval; files ``Literary.csv``, ``Drama.csv``,
  ``Expertise.csv``): columns ``prompt``, ``gt`` and ``option1..option5`` with ``option<i>_profile``
  (``option5`` may be empty). Judges name the speaker; this tests the judge, not the candidates (suite
  ``personaeval``).
* PersonaFeedback (https://huggingface.co/datasets/PersonalAILab/PersonaFeedback): JSONL records of a persona,
  a query and two responses with the human choice, in ``<split>/<tier>.jsonl`` files. Judges and reward models
  pick the better response (suite ``personafeedback``). The record keys are :data:`PERSONAFEEDBACK_FIELDS`
  unless ``fields`` renames them; unlike the other two formats, these names are not checked against the
  released files (none could be read while this was written).

Every reader validates its input; errors name the file, the line or row, and the field.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from personafuse.data.generators import ChatGenerator
from personafuse.data.schema import DataError, read_jsonl
from personafuse.data.synthesize import _first_json_object
from personafuse.eval.adherence import evaluate_pairwise, evaluate_persona_adherence
from personafuse.eval.candidates import Candidate, GenerationSettings
from personafuse.eval.io import ResultFile
from personafuse.eval.judges import ParseTally, parse_choice, parse_rating
from personafuse.eval.metrics import mean

PERSONAGYM_TASKS = {"Expected Action": "expected_action", "Toxicity": "toxicity_control",
                    "Linguistic Habits": "linguistic_habits", "Persona Consistency": "persona_consistency",
                    "Action Justification": "action_justification"}
PERSONAEVAL_REQUIRED = ("prompt", "gt", *(f"option{i}{s}" for i in range(1, 5) for s in ("", "_profile")))
PERSONAEVAL_OPTIONS = 5
PERSONAFEEDBACK_FIELDS = {"persona": "persona", "query": "question", "chosen": "chosen", "rejected": "rejected",
                          "response_a": "response_a", "response_b": "response_b", "label": "label"}


# PersonaGym


def load_personagym(questions_dir: str | os.PathLike, personas: str | os.PathLike | None = None) -> list[dict]:
    """Adherence items (``id``, ``persona``, ``question``, ``task``) from PersonaGym question files.

    With ``personas``, exactly the listed personas are read and each needs its ``<persona>.json``; without, every
    ``*.json`` in ``questions_dir`` is one persona (its file name without ``.json``).
    """
    folder = Path(questions_dir)
    if not folder.is_dir():
        raise DataError("not a directory; expected PersonaGym's questions folder (questions/benchmark-v1) with one "
                        "<persona>.json per persona", path=folder)
    if personas is None:
        files = sorted(folder.glob("*.json"))
        if not files:
            raise DataError("no <persona>.json question files", path=folder)
    else:
        files = []
        for name in load_persona_list(personas):
            file = folder / f"{name}.json"
            if not file.is_file():
                raise DataError(f"persona {name!r} from {personas} has no question file; expected {file.name}",
                                path=folder)
            files.append(file)
    items = []
    for file in files:
        persona = file.name[:-len(".json")]
        for key, questions in _personagym_questions(file).items():
            items += [{"id": f"{persona}/{PERSONAGYM_TASKS[key]}/{k}", "persona": persona, "question": q,
                       "task": PERSONAGYM_TASKS[key]} for k, q in enumerate(questions)]
    return items


def _personagym_questions(file: Path) -> dict[str, list[str]]:
    try:
        questions = json.loads(file.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg} at column {e.colno})", path=file, line=e.lineno) from None
    except UnicodeDecodeError:
        raise DataError("not UTF-8 text", path=file) from None
    if not isinstance(questions, dict):
        raise DataError(f"expected a JSON object keyed by the tasks {list(PERSONAGYM_TASKS)}, "
                        f"got {type(questions).__name__}", path=file)
    for key in PERSONAGYM_TASKS:
        if key not in questions:
            raise DataError(f"missing task; every question file needs {list(PERSONAGYM_TASKS)}", field=key, path=file)
    for key, value in questions.items():
        if key not in PERSONAGYM_TASKS:
            raise DataError(f"unknown task; the tasks are {list(PERSONAGYM_TASKS)}", field=key, path=file)
        if not isinstance(value, list) or not value:
            raise DataError(f"expected a non-empty list of questions, got {value!r:.80}", field=key, path=file)
        for k, question in enumerate(value):
            if not isinstance(question, str) or not question.strip():
                raise DataError(f"expected a non-empty question string, got {question!r:.80}", field=f"{key}[{k}]",
                                path=file)
    return questions


def load_persona_list(path: str | os.PathLike) -> list[str]:
    """Persona descriptions from PersonaGym's ``code/personas.py`` (its list literal, read with :mod:`ast`),
    a JSON list of strings, or a text file with one persona a line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"cannot read the persona list ({e.strerror})", path=path) from None
    if path.suffix == ".py":
        names = _python_list(text, path)
    elif path.suffix == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON ({e.msg} at column {e.colno})", path=path, line=e.lineno) from None
        if not isinstance(names, list):
            raise DataError(f"expected a JSON list of persona strings, got {type(names).__name__}", path=path)
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    for k, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"persona {k} is not a non-empty string: {name!r:.80}", path=path)
    if not names:
        raise DataError("no personas in the list", path=path)
    if len(set(names)) != len(names):
        raise DataError(f"duplicate persona {next(n for n in names if names.count(n) > 1)!r}", path=path)
    return names


def _python_list(text: str, path: Path) -> list:
    try:
        module = ast.parse(text, filename=str(path))
    except SyntaxError as e:
        raise DataError(f"not Python ({e.msg})", path=path, line=e.lineno) from None
    lists = {target.id: node.value for node in module.body if isinstance(node, ast.Assign)
             for target in node.targets if isinstance(target, ast.Name) and isinstance(node.value, ast.List)}
    if not lists:
        raise DataError("no list assignment (expected `benchmark_personas = [...]`)", path=path)
    node = lists.get("benchmark_personas") or next(iter(lists.values()))
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise DataError("the persona list holds something other than string literals", path=path,
                        line=node.lineno) from None


def load_personagym_rubrics(folder: str | os.PathLike) -> dict[str, str]:
    """PersonaGym's rubric templates (``rubrics/<Task>.txt``), keyed by task id; each must hold ``{persona}``,
    ``{question}`` and ``{response}`` (``{score_example}`` is optional)."""
    folder = Path(folder)
    rubrics = {}
    for key, task in PERSONAGYM_TASKS.items():
        file = folder / f"{key}.txt"
        if not file.is_file():
            raise DataError(f"no rubric for task {key!r}; expected {file.name} (PersonaGym's rubrics folder)",
                            path=folder)
        text = file.read_text(encoding="utf-8-sig")
        for slot in ("{persona}", "{question}", "{response}"):
            if slot not in text:
                raise DataError(f"rubric template lacks the {slot} slot", path=file)
        rubrics[task] = text
    return rubrics


_RUBRIC_SLOT = re.compile(r"\{(persona|question|response|score_example)\}")
RUBRIC_SYSTEM = "You are an accurate, faithful, critical and fair judge of how well a response plays a persona."
NO_SCORE_EXAMPLES = "(none given; judge by the criteria above)"


def rubric_prompt(rubrics: Mapping[str, str]) -> Callable[[dict, str], list[dict]]:
    """A judge prompt from PersonaGym's rubric template of the item's task (no score examples: the authors
    generate them per question with a separate model)."""
    def prompt(item: dict, reply: str) -> list[dict]:
        values = {"persona": item["persona"], "question": item["question"], "response": reply,
                  "score_example": NO_SCORE_EXAMPLES}
        text = _RUBRIC_SLOT.sub(lambda m: values[m.group(1)], rubrics[item["task"]])
        return [{"role": "system", "content": RUBRIC_SYSTEM}, {"role": "user", "content": text}]

    return prompt


def parse_final_score(text: str) -> float | None:
    """The rubric's closing "Therefore, the final score is N" (the last one, in 1-5); else :func:`parse_rating`."""
    found = re.findall(r"final score is\s*\**\s*(\d+(?:\.\d+)?)", text, flags=re.IGNORECASE)
    if found:
        value = float(found[-1])
        return value if 1 <= value <= 5 else None
    return parse_rating(text)


def evaluate_personagym(candidates: Sequence[Candidate], items: Sequence[dict], judges: Mapping[str, ChatGenerator],
                        store: ResultFile, settings: GenerationSettings, progress: bool = True,
                        rubrics: Mapping[str, str] | None = None) -> dict:
    """Adherence scores plus PersonaGym's per-persona PersonaScore (the mean of that persona's task means).

    With ``rubrics`` (:func:`load_personagym_rubrics`) the judges grade with the authors' rubric templates and
    reason before the final score; without, with the one-line rubrics of the adherence suite."""
    if rubrics is None:
        results = evaluate_persona_adherence(candidates, items, judges, store, settings, progress)
    else:
        results = evaluate_persona_adherence(candidates, items, judges, store, settings, progress,
                                             rubric_prompt(rubrics), parse_final_score, judge_max_new_tokens=512)
    for row in results["candidates"].values():
        by_persona: dict[str, dict[str, list]] = {}
        for item, score in zip(items, row["scores"], strict=True):
            by_persona.setdefault(item["persona"], {}).setdefault(item["task"], []).append(score)
        row["personas"] = {p: mean([mean(s) for s in tasks.values()]) for p, tasks in by_persona.items()}
    return results


# PersonaEval


def load_personaeval(path: str | os.PathLike) -> list[dict]:
    """Role identification items from one PersonaEval CSV or a folder of them (the track is the file name).

    Each item: ``id`` (``<track>-<row>``), ``track``, ``prompt``, ``candidates`` (names), ``profiles`` and
    ``answer`` (the index of ``gt`` among the candidates).
    """
    path = Path(path)
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files:
        raise DataError("no PersonaEval .csv files (Literary.csv, Drama.csv, Expertise.csv)", path=path)
    items = []
    for file in files:
        items += _personaeval_file(file)
    return items


def _personaeval_file(file: Path) -> list[dict]:
    if not file.is_file():
        raise DataError("no such file; expected a PersonaEval CSV or a folder of them", path=file)
    items = []
    with open(file, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        for column in PERSONAEVAL_REQUIRED:
            if column not in header:
                raise DataError(f"missing column; PersonaEval files have {list(PERSONAEVAL_REQUIRED)} "
                                f"(option5 and option5_profile may be added)", field=column, path=file, line=1)
        row_number = 0
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except (csv.Error, UnicodeDecodeError) as e:
                raise DataError(f"unreadable CSV ({e})", path=file, line=line) from None
            row_number += 1
            try:
                items.append(_personaeval_item(row, f"{file.stem}-{row_number}", file.stem))
            except DataError as e:
                raise e.at(file, line) from None
    if not items:
        raise DataError("no rows", path=file)
    return items


def _personaeval_item(row: dict, item_id: str, track: str) -> dict:
    if None in row:
        raise DataError(f"row has more cells than the header has columns ({len(row) - 1 + len(row[None])})")
    for column in ("prompt", "gt", "option1", "option2", "option3", "option4"):
        if not (row.get(column) or "").strip():
            raise DataError("expected a non-empty value", field=column)
    names, profiles = [], []
    for i in range(1, PERSONAEVAL_OPTIONS + 1):
        name = (row.get(f"option{i}") or "").strip()
        if not name:
            continue
        if name in names:
            raise DataError(f"duplicate candidate {name!r} (also option{names.index(name) + 1})", field=f"option{i}")
        names.append(name)
        profiles.append((row.get(f"option{i}_profile") or "").strip())
    gt = row["gt"].strip()
    if gt not in names:
        raise DataError(f"ground truth {gt!r} is none of the candidates {names}", field="gt")
    return {"id": item_id, "track": track, "prompt": row["prompt"].strip(), "candidates": names,
            "profiles": profiles, "answer": names.index(gt)}


def personaeval_prompt(item: dict) -> list[dict]:
    listed = "\n".join(f"- {name}: {profile}" if profile else f"- {name}"
                       for name, profile in zip(item["candidates"], item["profiles"], strict=True))
    return [{"role": "user", "content": f"{item['prompt']}\n\nCandidate characters:\n{listed}\n\n"
                                        "Who is speaking as the second character? Give the probability of each "
                                        "candidate as a JSON object mapping every name above to a number, the "
                                        "numbers summing to 1."}]


def parse_probabilities(text: str, names: Sequence[str]) -> list[float] | None:
    """Per-candidate probabilities from a judge reply: a JSON object keyed by the names (case-insensitive,
    renormalised), or a one-hot vector when the reply names exactly one candidate; ``None`` otherwise."""
    found = _first_json_object(text)
    if found:
        by_name = {str(k).strip().lower(): v for k, v in found.items()}
        values = [by_name.get(n.lower()) for n in names]
        if all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in values) and sum(values) > 0:
            return [v / sum(values) for v in values]
    pick = parse_choice(text, names)
    return None if pick is None else [float(k == pick) for k in range(len(names))]


def evaluate_personaeval(judges: Mapping[str, ChatGenerator], items: Sequence[dict], min_accuracy: float = 0.8) -> dict:
    """Per judge: top-1 and top-2 accuracy and mean rank of the true speaker (over parsable replies), accuracy
    with malformed replies counted as wrong, chance, a ``trusted`` verdict (top-1 over all items reaches
    ``min_accuracy``; PersonaEval's humans reach about 0.9), and the same numbers per track."""
    if not judges:
        raise ValueError("personaeval needs at least one judge (judges: {name: generator spec})")
    results = {}
    for name, judge in judges.items():
        tally = ParseTally()
        replies = judge.generate([personaeval_prompt(i) for i in items], temperature=0, max_new_tokens=256)
        probs = [tally.add(parse_probabilities(r, i["candidates"]), r) for r, i in zip(replies, items, strict=True)]
        tracks = sorted({i["track"] for i in items})
        by_track = {t: _role_scores([p for p, i in zip(probs, items, strict=True) if i["track"] == t],
                                    [i for i in items if i["track"] == t], min_accuracy) for t in tracks}
        results[name] = {**_role_scores(probs, items, min_accuracy), "tracks": by_track, **tally.to_dict()}
    return results


def _role_scores(probs: Sequence[list[float] | None], items: Sequence[dict], min_accuracy: float) -> dict:
    ranks = []
    for p, item in zip(probs, items, strict=True):
        if p is not None:  # ties rank the true speaker last among them: no credit for an undecided judge
            ranks.append(1 + sum(q >= p[item["answer"]] for k, q in enumerate(p) if k != item["answer"]))
    top1_all = sum(r == 1 for r in ranks) / len(items)
    return {"accuracy": sum(r == 1 for r in ranks) / len(ranks) if ranks else None,
            "top2_accuracy": sum(r <= 2 for r in ranks) / len(ranks) if ranks else None,
            "mean_rank": mean(ranks), "n": len(ranks), "accuracy_counting_malformed_as_wrong": top1_all,
            "chance": sum(1 / len(i["candidates"]) for i in items) / len(items), "min_accuracy": min_accuracy,
            "trusted": top1_all >= min_accuracy}


# PersonaFeedback


def load_personafeedback(path: str | os.PathLike, fields: Mapping[str, str] | None = None) -> list[dict]:
    """Pairwise items (``id``, ``group``, ``persona``, ``query``, ``response_a``, ``response_b``, ``gold``) from
    a PersonaFeedback JSONL file or a folder of them (``group``: the file's path below the folder, e.g.
    ``specific/hard``).

    A record holds ``persona``, ``query`` and either ``chosen`` + ``rejected`` (the chosen one is put at A on
    even lines and at B on odd ones, so position bias cannot score) or ``response_a`` + ``response_b`` + ``label``
    (``A``/``B`` or ``1``/``2``). ``fields`` maps these roles to the file's keys (defaults
    :data:`PERSONAFEEDBACK_FIELDS`); other keys are ignored.
    """
    unknown = sorted(set(fields or {}) - set(PERSONAFEEDBACK_FIELDS))
    if unknown:
        raise ValueError(f"unknown PersonaFeedback field role(s) {unknown}; roles are {list(PERSONAFEEDBACK_FIELDS)}")
    keys = {**PERSONAFEEDBACK_FIELDS, **(fields or {})}
    path = Path(path)
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise DataError("no PersonaFeedback .jsonl files (expected a .jsonl file or a folder of them)", path=path)
    items = []
    for file in files:
        group = file.relative_to(path).with_suffix("").as_posix() if path.is_dir() else file.stem
        count = len(items)
        for lineno, record in read_jsonl(file):
            try:
                items.append(_personafeedback_item(record, keys, f"{group}-{lineno}", group, lineno))
            except DataError as e:
                raise e.at(file, lineno) from None
        if len(items) == count:
            raise DataError("no records", path=file)
    return items


def _personafeedback_item(record: dict, keys: Mapping[str, str], item_id: str, group: str, lineno: int) -> dict:
    def text(role: str) -> str:
        key = keys[role]
        if key not in record:
            raise DataError(f"missing (the {role} field; rename with fields.{role}=<key>); "
                            f"the record has {sorted(record)}", field=key)
        value = record[key]
        if isinstance(value, Mapping):  # a structured profile
            value = "\n".join(f"{k}: {v}" for k, v in value.items())
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"expected a non-empty string, got {value!r:.80}", field=key)
        return value.strip()

    item = {"id": item_id, "group": group, "persona": text("persona"), "query": text("query")}
    if keys["chosen"] in record or keys["rejected"] in record:
        chosen, rejected = text("chosen"), text("rejected")
        if lineno % 2:
            return {**item, "response_a": rejected, "response_b": chosen, "gold": "b"}
        return {**item, "response_a": chosen, "response_b": rejected, "gold": "a"}
    a, b = text("response_a"), text("response_b")
    label = record.get(keys["label"])
    gold = {"a": "a", "b": "b", "1": "a", "2": "b"}.get(str(label).strip().lower())
    if gold is None or isinstance(label, bool):
        raise DataError(f"expected A/B or 1/2, got {label!r}", field=keys["label"])
    return {**item, "response_a": a, "response_b": b, "gold": gold}


def evaluate_personafeedback(items: Sequence[dict], judges: Mapping[str, ChatGenerator] | None = None,
                             reward_models: Mapping[str, Callable[[str, str, str], float]] | None = None) -> dict:
    """:func:`~personafuse.eval.adherence.evaluate_pairwise` per file group (``specific/easy``, ...) and over all."""
    if not judges and not reward_models:
        raise ValueError("personafeedback needs a judge or a reward model (judges / reward_models)")
    groups = {g: [i for i in items if i["group"] == g] for g in dict.fromkeys(i["group"] for i in items)}
    by_group = {g: evaluate_pairwise(rows, judges, reward_models) for g, rows in groups.items()}
    overall = {}
    for name in next(iter(by_group.values())):
        parts = [r[name] for r in by_group.values()]
        n = sum(p["n"] for p in parts)
        overall[name] = {"kind": parts[0]["kind"], "n": n,
                         "accuracy": sum(p["accuracy"] * p["n"] for p in parts if p["n"]) / n if n else None}
        if "malformed" in parts[0]:
            overall[name]["malformed"] = sum(p["malformed"] for p in parts)
    return {"overall": overall, "groups": by_group}

