"""``gpu_check.py`` must not waste a GPU run: it runs from a plain checkout and records every failure."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("triton")

KERNELS = Path(__file__).resolve().parent
# Run the script as a GPU machine would: no editable install on the import path, nothing imported yet.
PLAIN_CHECKOUT = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__ and "editable" not in getattr(f, "__name__", "")]
sys.argv = ["kernels/gpu_check.py", *sys.argv[1:]]
runpy.run_path("kernels/gpu_check.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", KERNELS / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_from_plain_checkout(tmp_path):
    env = {"OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_CHECKOUT, "--dry-run"], cwd=KERNELS.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["sections_done"] == ["environment", "correctness", "integration", "cuda_graph", "compile", "timings", "tuning", "breakdown"]
    assert data["environment"]["imported_via"] == "checkout shim"
    checks = data["correctness"]
    assert not [c for c in checks if "error" in c], [c["error"] for c in checks if "error" in c][0]
    assert all(c["passed"] for c in checks if "skipped" not in c)
    assert {c["case"] for c in checks if "skipped" in c} == {"int64_offsets"}
    assert {c["gating"] for c in checks if c["case"] == "routed_lora"} == {"dense", "top2", "onehot"}
    assert {c["layout"] for c in checks if c["case"] == "routed_lora"} == {"contiguous", "noncontig_x", "stride0_gates"}
    assert {c["path"] for c in checks if c["case"] == "routed_lora"} == {"row_tile", "decode", "shrink_expand"}
    assert [c["tag"] for c in checks if "config" in c] == ["config 0", "config 1"]
    zero_checked = [c for c in checks if "unselected_grads_zero" in c]
    assert zero_checked and all(c["unselected_grads_zero"] for c in zero_checked)
    assert {c["gating"] for c in zero_checked} >= {"top2", "onehot"}
    assert data["integration"]["passed"], data["integration"]
    for section in ("cuda_graph", "compile", "breakdown"):
        assert data[section] == {"skipped": "skipped: no CUDA"}
    timings = data["timings"]
    assert timings and all("error" not in row and set(row["ms"]) == {"fwd", "fwd+bwd"} for row in timings)
    assert set(timings[0]["ms"]["fwd"]) == {"fused", "torch", "lora_Kr", "lora_r", "base_gemm"}
    assert [row["grad_gates"] for row in timings] == [False, False, True]
    assert "| 32→24 | 16 | sequence | top2 | fwd |" in (tmp_path / "results.md").read_text()
    assert "| 32→24 | 16 | sequence | top2 +dgates | fwd+bwd |" in (tmp_path / "results.md").read_text()
    assert data["tuning"] == {"best": {}, "failed": {}}  # the interpreter runs one config, nothing is timed


def test_failing_case_records_traceback_and_run_goes_on(gpu_check):
    def broken():
        raise ZeroDivisionError("kernel exploded")

    row = gpu_check.run_case("routed_lora", broken, dtype="float32")
    assert row["passed"] is False and row["dtype"] == "float32"
    assert "ZeroDivisionError: kernel exploded" in row["error"] and "in broken" in row["error"]
    assert gpu_check.run_case("ok", lambda: {"passed": True})["passed"] is True


def test_results_rewritten_after_every_section(gpu_check, tmp_path):
    results = gpu_check.Results(tmp_path, {"date": "d", "dry_run": True})
    results.section("environment", {"gpu": "none"})
    assert json.loads((tmp_path / "results.json").read_text())["sections_done"] == ["environment"]
    results.section("correctness", [{"case": "routed_lora", "passed": False, "error": "Traceback"}])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["sections_done"] == ["environment", "correctness"] and saved["correctness"][0]["error"] == "Traceback"
    assert "0 passed, 1 failed" in (tmp_path / "results.md").read_text()


def test_budget_skips_remaining_timing_cases(gpu_check):
    cases = gpu_check.timing_cases(dry_run=False)
    assert len(cases) == 3 * 5 * 5 + 3 and cases[0]["tokens"] == 8192 and cases[0]["gating"] == "top2"
    assert [c["d_in"] for c in cases if c["grad_gates"]] == [4096, 4096, 14336]
    assert all(c["tokens"] == 8192 and c["gating"] == "top2" for c in cases if c["grad_gates"])
    spent = gpu_check.Budget(10.0, time.perf_counter() - 11.0)
    rows = gpu_check.timings(cases[:3], None, {}, None, "cpu", spent)
    assert [row["skipped"] for row in rows] == ["budget: 10 s"] * 3
    budget = gpu_check.Budget(10.0, time.perf_counter() - 5.0)
    assert budget.allows_next()
    budget.record(6.0)  # the next case, as long as the longest so far, would overrun
    assert not budget.allows_next()


def test_effective_cost_counts_selected_experts(gpu_check):
    case = {"tokens": 8, "d_in": 4, "d_out": 2, "k": 10, "r": 3, "gating": "top2"}
    fwd_bytes, fwd_flops = gpu_check.effective_cost(case, 2)["fwd"]
    assert fwd_flops == 2 * 8 * 2 * 3 * 6
    assert fwd_bytes == 2 * (8 * 4 + 2 * 8 * 2 + 2 * 3 * 6)
    assert gpu_check.effective_cost({**case, "gating": "dense"}, 2)["fwd"][1] == 5 * fwd_flops
