"""The wheel as a user gets it: complete, installable into a fresh venv, and every workflow runs from an
empty directory with no checkout on the path (train experts, train the router, export a preset, generate,
evaluate). No download: the wheel builds without isolation and the venv reuses this interpreter's packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
# Repository folder -> where its files land in the wheel.
SHIPPED = {"personafuse": "personafuse", "kernels": "personafuse/kernels", "recipes": "personafuse/recipes",
           "conf": "personafuse/conf"}
TINY = ["experts.r=2", "experts.alpha=4", "trainer.expert.max_steps=2", "trainer.expert.per_device_train_batch_size=2",
        "trainer.router.max_steps=2", "data.max_length=512", "trainer.expert.disable_tqdm=true",
        "+trainer.router.disable_tqdm=true"]
TIMEOUT = 600  # per command; a loaded 2-core machine is slow to even import torch


def run(cmd: list, cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}: {' '.join(map(str, cmd))}\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("wheel")
    log = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", out, REPO],
              cwd=out)
    (path,) = out.glob("personafuse-*.whl")
    return path, log


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; its dependencies come from this interpreter's site-packages
    through a .pth file (paths from a .pth are not site dirs, so the checkout's editable hook stays off)."""
    root = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--without-pip", root], cwd=root)
    python = root / "bin" / "python"
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).strip())
    here = sysconfig.get_paths()
    (purelib / "zz_dependencies.pth").write_text("\n".join(sorted({here["purelib"], here["platlib"]})) + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
         "--force-reinstall", wheel[0]], cwd=root)
    return root


def test_build_is_complete_by_construction(wheel):
    path, log = wheel
    assert "absent from the packages configuration" not in log, log[-3000:]
    names = set(zipfile.ZipFile(path).namelist())
    missing = []
    for folder, target in SHIPPED.items():
        for file in (REPO / folder).rglob("*"):
            relative = file.relative_to(REPO / folder)
            if folder == "personafuse" and relative.parts[0] in ("kernels", "recipes", "conf"):
                continue  # a clone's links to the mapped folders
            shipped = file.is_file() and "__pycache__" not in relative.parts and file.suffix != ".pyc"
            if shipped and f"{target}/{relative.as_posix()}" not in names:
                missing.append(f"{folder}/{relative.as_posix()}")
    assert not missing, f"not in the wheel: {missing[:20]}"
    assert not [n for n in names if n.startswith(("tests/", "recipes/", "conf/", "kernels/"))]


def test_installed_wheel_runs_every_workflow_from_an_empty_dir(venv, tiny_model_dir, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PERSONAFUSE_DEBUG")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    cli = venv / "bin" / "personafuse"
    where = run([venv / "bin" / "python", "-c", "import personafuse; print(personafuse.__file__)"], work, env)
    assert where.strip().startswith(str(venv)), where

    overrides = [f"model.path={tiny_model_dir}", "run_dir=run", *TINY]
    run([cli, "train-experts", *overrides], work, env)
    assert sorted(p.name for p in (work / "run" / "experts").iterdir()) == sorted(
        f"{t}_{pole}" for t in ("openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism")
        for pole in ("high", "low"))
    out = run([cli, "train-router", *overrides], work, env)
    assert "[router] held-out top-pole accuracy" in out, out[-2000:]
    bundle = work / "run" / "bundle"
    assert (bundle / "router.safetensors").is_file()

    out = run([cli, "export", "--bundle", bundle, "--out", "counselor", "--preset", "counselor"], work, env)
    assert out.strip().endswith(f"wrote {work / 'counselor'}") or "wrote counselor" in out, out[-2000:]
    blend = json.loads((work / "counselor" / "personafuse_blend.json").read_text())
    assert blend["label"] == "counselor", blend
    assert list((work / "counselor").glob("*.safetensors"))

    out = run([cli, "generate", "--bundle", bundle, "--max-new-tokens", "4", "hello there"], work, env)
    assert "> hello there" in out, out[-2000:]

    run([cli, "evaluate", "--bundle", bundle, "--out", "eval", "--suites", "routing", "--candidates", "personafuse",
         "--limit", "2"], work, env)
    results = json.loads((work / "eval" / "results.json").read_text())
    assert "routing" in results, sorted(results)
    assert sorted(p.name for p in work.iterdir()) == ["counselor", "eval", "run"], "wrote outside its outputs"


def test_installed_wheel_reports_a_user_error_in_one_line(venv, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PERSONAFUSE_DEBUG")}
    proc = subprocess.run([venv / "bin" / "personafuse", "train-experts", "experts.alpha=0", "run_dir=run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["personafuse train-experts: error: experts.alpha must be > 0, got 0 "
                     "(--debug or PERSONAFUSE_DEBUG=1 shows the traceback)"], proc.stderr[-2000:]
