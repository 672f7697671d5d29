import dataclasses
import json
from collections import Counter

import pytest

from personafuse.data import DataError
from personafuse.data.personas import (
    ISCO08_MAJOR_GROUPS,
    MBTI_TYPES,
    Persona,
    build_persona_bank,
    deduplicate,
    load_personas,
    sample_personas,
    save_personas,
)
from personafuse.traits import BIG_FIVE


def test_bank_is_deterministic_and_grows_as_a_prefix():
    bank = build_persona_bank(64, seed=3)
    assert bank == build_persona_bank(64, seed=3)
    assert build_persona_bank(32, seed=3) == bank[:32]
    assert [p.id for p in build_persona_bank(64, seed=4)] != [p.id for p in bank]


def test_bank_covers_types_groups_and_valid_profiles():
    bank = build_persona_bank(160, seed=0)
    assert Counter(p.mbti for p in bank) == dict.fromkeys(MBTI_TYPES, 10)
    assert {p.isco_group for p in bank} == set(ISCO08_MAJOR_GROUPS)
    assert len({p.id for p in bank}) == len({p.description for p in bank}) == 160
    for p in bank:
        assert set(p.big_five) == set(BIG_FIVE.traits) and all(-1 <= v <= 1 for v in p.big_five.values())
        assert p.occupation in ISCO08_MAJOR_GROUPS[p.isco_group][1] and p.mbti in p.description
        assert Persona.from_dict(p.to_dict()) == p
    extraverts = [p.big_five["extraversion"] for p in bank if p.mbti[0] == "E"]
    introverts = [p.big_five["extraversion"] for p in bank if p.mbti[0] == "I"]
    assert sum(extraverts) / len(extraverts) > 0.2 > -0.2 > sum(introverts) / len(introverts)
    assert bank[0].group("occupation") == ISCO08_MAJOR_GROUPS[bank[0].isco_group][0]
    assert bank[0].group("age").endswith("0s") and bank[0].group("mbti") == bank[0].mbti
    with pytest.raises(ValueError, match="group_by"):
        bank[0].group("height")


def test_deduplicate_removes_exact_and_near_duplicates():
    a, b = build_persona_bank(2, seed=1)
    exact = dataclasses.replace(a, id="exact", description="  " + a.description.upper() + " ")
    older = a.description.replace(f"A {a.age}-year-old", f"A {a.age + 1}-year-old")
    near = dataclasses.replace(a, id="near", age=a.age + 1, description=older)
    kept, n_exact, n_near = deduplicate([a, exact, b, near])
    assert (kept, n_exact, n_near) == ([a, b], 1, 1)
    assert deduplicate([a, near], threshold=1.0) == ([a, near], 0, 0)  # 1.0: exact only


def test_save_load_round_trip_and_errors_name_the_line(tmp_path):
    bank = build_persona_bank(5, seed=0)
    path = tmp_path / "personas.jsonl"
    save_personas(path, bank)
    assert load_personas(path) == bank
    record = bank[1].to_dict()
    record["big_five"]["openness"] = 1.5
    lines = path.read_text().splitlines()
    lines[1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:2: field 'big_five.openness'"):
        load_personas(path)
    lines[1] = json.dumps({**bank[1].to_dict(), "mbti": "XYZW"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="2: field 'mbti'"):
        load_personas(path)
    lines[1] = lines[0]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="2: field 'id': duplicate id"):
        load_personas(path)


def test_sampling_depends_only_on_the_key():
    bank = build_persona_bank(30, seed=0)
    picks = sample_personas(bank, 3, "0/q1/1")
    assert picks == sample_personas(list(reversed(bank))[::-1], 3, "0/q1/1")
    assert len(set(picks)) == 3 and picks != sample_personas(bank, 3, "0/q2/1")
    with pytest.raises(ValueError, match="bank of 30"):
        sample_personas(bank, 31, "x")
