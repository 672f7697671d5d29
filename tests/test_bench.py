"""The benchmark suite runs end to end (``--quick``) and writes parseable results; timings are not asserted."""

import json

from personafuse import bench


def test_quick_bench_writes_all_sections(tmp_path, capsys):
    bench.main(["--out", str(tmp_path), "--quick"])

    results = json.loads((tmp_path / "results.json").read_text())
    assert {"torch", "cpu_count", "date"} <= results["machine"].keys()
    assert results["quick"] is True

    delta = results["delta"]
    assert len(delta) == len(bench.QUICK.delta_shapes) * 4
    assert {r["gates"] for r in delta} == {"sequence, dense", "sequence, top-2", "token, dense", "token, top-2"}
    assert all(r["ratio"] > 0 and r["stacked"]["median_ms"] > 0 for r in delta)

    train = {r["case"]: r for r in results["train_step"]}
    assert train.keys() == bench.TRAIN_CASES.keys()
    for case in ("personafuse", "personafuse_loop", "lora_r16", "lora_r160"):
        assert "error" not in train[case], train[case]
        assert train[case]["step"]["median_ms"] > 0
    assert train["personafuse"]["trainable_params"] == train["lora_r160"]["trainable_params"]
    xlora = train["xlora"]
    assert "error" in xlora or xlora["time_vs_xlora"] == 1.0

    router = results["router"]
    assert router["expected_share"] == router["layer"] / router["num_layers"]

    table = (tmp_path / "results.md").read_text()
    for heading in ("Routed LoRA delta", "Training step", "Router overhead"):
        assert heading in table
    for method in bench.TRAIN_CASES.values():
        assert method in table
    assert table in capsys.readouterr().out
