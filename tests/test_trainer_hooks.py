"""Our trainers override private Trainer/TRL methods; an upgrade that removes or reshapes one must fail here,
with a message that says what to fix, instead of silently skipping our checkpointing or routing."""

from __future__ import annotations

import inspect

import pytest
import transformers
import trl

from personafuse.apc.distill import DiscriminatorTrainer
from personafuse.apc.dpo import PersonaDPOTrainer
from personafuse.training.experts import ExpertSFTTrainer
from personafuse.training.router import RouterTrainer
from personafuse.workflows.persona_sft import PersonaSFTTrainer, StackSFTTrainer

TRAINERS = [ExpertSFTTrainer, RouterTrainer, PersonaDPOTrainer, DiscriminatorTrainer, PersonaSFTTrainer,
            StackSFTTrainer]
# Upstream methods we override on purpose. A new override must be added here (the test below says so).
OVERRIDES = {"_save_checkpoint", "_save", "_load_from_checkpoint", "_get_train_sampler",
             "_set_signature_columns_if_needed", "_compute_loss", "compute_ref_log_probs"}


def ours(cls) -> bool:
    return cls.__module__.split(".")[0] == "personafuse"


def overridden(trainer: type) -> list[tuple[str, type, type | None]]:
    """(name, our class defining it, the upstream class it overrides or None) for every candidate hook."""
    found = []
    for cls in trainer.__mro__:
        if not ours(cls):
            continue
        for name, value in vars(cls).items():
            if not inspect.isfunction(value) or (name.startswith("__") and name.endswith("__")):
                continue
            if name in OVERRIDES or name.startswith("_"):
                upstream = next((c for c in trainer.__mro__ if not ours(c) and name in vars(c)), None)
                found.append((name, cls, upstream))
    return found


def accepts(ours_sig: inspect.Signature, theirs_sig: inspect.Signature) -> bool:
    """Whether our override takes every argument the upstream caller may pass, by the same names."""
    params = list(ours_sig.parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params) and any(p.kind is p.VAR_KEYWORD for p in params):
        return True
    names = [p.name for p in params]
    return [p.name for p in theirs_sig.parameters.values()] == names


def versions() -> str:
    return f"transformers {transformers.__version__}, trl {trl.__version__}"


@pytest.mark.parametrize("trainer", TRAINERS, ids=lambda c: c.__name__)
def test_every_overridden_hook_still_exists_with_the_same_signature(trainer):
    problems = []
    for name, cls, upstream in overridden(trainer):
        where = f"{cls.__module__}.{cls.__qualname__}.{name}"
        if name in OVERRIDES and upstream is None:
            problems.append(f"{where} overrides a method that no base class of {trainer.__name__} has any more "
                            f"({versions()}): our override is never called; port it to the new hook and update "
                            f"the tested range in pyproject.toml")
        elif upstream is not None and name not in OVERRIDES:
            problems.append(f"{where} overrides {upstream.__module__}.{upstream.__qualname__}.{name}: add it to "
                            f"OVERRIDES in {__name__} so an upgrade that changes it is caught")
        elif upstream is not None:
            theirs = inspect.signature(vars(upstream)[name])
            mine = inspect.signature(vars(cls)[name])
            if not accepts(mine, theirs):
                problems.append(f"{where}{mine} no longer matches {upstream.__module__}.{upstream.__qualname__}."
                                f"{name}{theirs} ({versions()}): update the override and the tested range in "
                                f"pyproject.toml")
    assert not problems, "\n".join(problems)


def test_the_guard_reports_a_vanished_and_a_changed_hook(monkeypatch):
    from transformers import Trainer

    monkeypatch.delattr(Trainer, "_get_train_sampler")
    assert any(name == "_get_train_sampler" and upstream is None for name, _, upstream in overridden(ExpertSFTTrainer))
    with pytest.raises(AssertionError, match="_get_train_sampler overrides a method that no base class"):
        test_every_overridden_hook_still_exists_with_the_same_signature(ExpertSFTTrainer)
    monkeypatch.undo()

    def reshaped(self, output_dir, state_dict, safe):
        raise AssertionError("never called")

    monkeypatch.setattr(Trainer, "_save", reshaped)
    with pytest.raises(AssertionError, match=r"_save\(self, output_dir.*no longer matches"):
        test_every_overridden_hook_still_exists_with_the_same_signature(RouterTrainer)


def test_dependency_ranges_are_bounded_to_the_tested_majors():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = {d.split(">")[0].split("<")[0].split("=")[0].strip(): d for d in deps}
    for name in ("transformers", "trl", "peft", "accelerate"):
        assert "<" in spec[name], f"{name} needs an upper bound (the private hooks are only tested there): {spec[name]}"
