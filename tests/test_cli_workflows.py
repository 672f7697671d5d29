"""``personafuse <workflow> [hydra overrides]``: every recipe is a subcommand, Hydra's own flags work, a user's
config directory joins the search path, and a user error in a recipe is one line with exit 2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from personafuse.cli import HYDRA_WORKFLOWS, main

REPO = Path(__file__).resolve().parents[1]


def test_every_recipe_is_a_workflow():
    recipes = {p.stem for p in (REPO / "recipes").glob("*.py") if p.stem != "__init__"}
    assert {module for module, _ in HYDRA_WORKFLOWS.values()} == recipes


def test_help_lists_every_workflow(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in [*HYDRA_WORKFLOWS, "generate", "explain", "bench"]:
        assert f"\n    {name} " in out or f"\n    {name}\n" in out, name


def test_cfg_job_composes_with_overrides_and_a_user_config_dir(tmp_path, capsys):
    mine = tmp_path / "conf" / "model"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text(yaml.safe_dump({"_target_": "personafuse.base_models.load_base_model",
                                                    "path": "/models/mine", "dtype": "float32"}))
    assert main(["train-router", "--config-dir", str(tmp_path / "conf"), "model=mine", "router=poles",
                 "--cfg", "job"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["path"] == "/models/mine"
    assert cfg["router"]["config"]["gating"] == "poles"


def test_export_takes_flags_or_hydra_overrides(capsys):
    assert main(["export", "preset=tutor", "kind=adapter", "--cfg", "job"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["preset"], cfg["kind"]) == ("tutor", "adapter")
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--bundle", "b", "--out", "o"])  # the flag form: one blend option is required
    assert exit_.value.code == 2
    assert "one of the arguments --preset --activations --gates --context is required" in capsys.readouterr().err


def test_recipe_user_error_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PERSONAFUSE_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["train-experts", "experts.alpha=0", f"run_dir={tmp_path}"])
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["personafuse train-experts: error: experts.alpha must be > 0, got 0 "
                   "(--debug or PERSONAFUSE_DEBUG=1 shows the traceback)"], err

    with pytest.raises(SystemExit) as exit_:  # Hydra prints the traceback and exits 1
        main(["train-experts", "--debug", "experts.alpha=0", f"run_dir={tmp_path}"])
    assert exit_.value.code == 1
    assert "ValueError: experts.alpha must be > 0, got 0" in capsys.readouterr().err
    assert "PERSONAFUSE_DEBUG" not in os.environ
